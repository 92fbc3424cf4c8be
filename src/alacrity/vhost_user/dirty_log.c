/* The dirty log's bit setter (vhost_user/dirty_log.py): the bits that `DirtyLog.mark` found
 * clear, set in one call instead of one FUTEX_WAKE_OP system call each.
 *
 * QEMU reads and clears the log with atomic exchanges while we set bits, and alacrityd and
 * a switch process set bits in the same bytes, so each is set with an atomic OR (a locked
 * instruction on x86, a full barrier like the futex's): no other writer's bit is lost.
 * Python has checked the pages against the log's size; they are checked again here, since
 * a bad index would write outside the mapping.
 */

#include <stdint.h>

#include "dirty_log.h"

int dirty_log_set(uint8_t *log, uint64_t size, const uint64_t *pages, uint64_t count)
{
    for (uint64_t i = 0; i < count; i++) {
        uint64_t page = pages[i];
        if (page >> 3 >= size)
            return -1;
        __atomic_fetch_or(log + (page >> 3), (uint8_t)(1u << (page & 7)), __ATOMIC_SEQ_CST);
    }
    return 0;
}

int dirty_log_set_one(uint8_t *log, uint64_t size, uint64_t page)
{
    if (page >> 3 >= size)
        return -1;
    __atomic_fetch_or(log + (page >> 3), (uint8_t)(1u << (page & 7)), __ATOMIC_SEQ_CST);
    return 0;
}
