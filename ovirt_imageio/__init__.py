"""ovirt-imageio: serve and move virtual machine disk images over NBD."""
