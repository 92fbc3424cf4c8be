"""virtio-blk wire definitions (virtio 1.1, 5.2)."""

import struct

SECTOR = 512

F_SIZE_MAX = 1
F_SEG_MAX = 2
F_RO = 5
F_BLK_SIZE = 6
F_FLUSH = 9
F_DISCARD = 13
F_WRITE_ZEROES = 14

T_IN = 0
T_OUT = 1
T_FLUSH = 4
T_GET_ID = 8
T_DISCARD = 11
T_WRITE_ZEROES = 13

S_OK = 0
S_IOERR = 1
S_UNSUPP = 2

ID_BYTES = 20

REQUEST_HEADER = struct.Struct("<IIQ")  # type, reserved (ioprio), sector
SEGMENT = struct.Struct("<QII")  # sector, num_sectors, flags (discard / write zeroes)
SEGMENT_F_UNMAP = 1

# capacity, size_max, seg_max, geometry(c,h,s), blk_size, topology(4 fields), writeback,
# unused, num_queues, max_discard_sectors, max_discard_seg, discard_sector_alignment,
# max_write_zeroes_sectors, max_write_zeroes_seg, write_zeroes_may_unmap, unused[3]
CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3x")
