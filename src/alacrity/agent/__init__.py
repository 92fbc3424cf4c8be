"""The guest agent (agent.c, built into the default image) and its protocol."""
