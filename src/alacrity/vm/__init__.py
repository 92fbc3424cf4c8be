"""Guests: the default image (image.py), QEMU launching (qemu.py), QMP control (qmp.py),
the accelerator choice (accel.py). Import the module you need: `alacrity vm run` starts
faster when it loads only what it uses."""
