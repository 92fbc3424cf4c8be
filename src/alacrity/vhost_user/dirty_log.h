/* The dirty log's bit setter: shared by the C source and the cffi cdef, so it holds
 * declarations only (no #include, no macros with expressions). See dirty_log.c. */

/* Set bit (page & 7) of byte (page >> 3) of `log`, `size` bytes long, for each of the
 * `count` pages, each with an atomic OR. 0, or -1 (and nothing more set) at the first page
 * beyond the log. */
int dirty_log_set(uint8_t *log, uint64_t size, const uint64_t *pages, uint64_t count);

/* The same for one page: a call without an array to convert (the common case). */
int dirty_log_set_one(uint8_t *log, uint64_t size, uint64_t page);
