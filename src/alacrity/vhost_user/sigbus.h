/* The SIGBUS guard: shared by the C source and the cffi cdef, so it holds declarations
 * only (no #include, no macros with expressions). See sigbus.c. */

#define GUARD_SLOTS 4096

/* Install the process-wide SIGBUS handler (once; it chains to the handler it replaced).
 * 0, or an errno. */
int guard_install(void);

/* 1 if SIGBUS reaches our handler now (nobody installed another one over it). */
int guard_active(void);

/* The huge page size of the hugetlbfs file behind `fd`, 0 for any other file, -errno. */
int64_t guard_hugepage_size(int fd);

/* Register [start, start + length) (a mapping of guest memory, page-aligned) so that a
 * SIGBUS inside it is repaired: its granule (the page size, or the huge page size of a
 * hugetlbfs mapping) is replaced by zeros. The slot, with *token, names the registration;
 * -1 if the table is full or the arguments are bad. Register before the first access. */
int64_t guard_register(uintptr_t start, uint64_t length, uint64_t granule, uint64_t *token);

/* Forget a registration; call it before the memory is unmapped. 0, or -1 if unknown. */
int guard_unregister(int64_t slot, uint64_t token);

/* Faults repaired in a registration (0 for an unknown one). */
uint64_t guard_faults(int64_t slot, uint64_t token);

/* Faults repaired in this process, and the address of the last one. */
uint64_t guard_total_faults(void);
uintptr_t guard_last_address(void);

/* Registrations in use. */
int64_t guard_used(void);
