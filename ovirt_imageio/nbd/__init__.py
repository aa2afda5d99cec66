"""Everything NBD: URLs, block status to extents, libnbd client, qemu-nbd."""
