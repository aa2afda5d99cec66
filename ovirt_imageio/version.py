# The version clients see (Server header, /info/). We are wire compatible
# with upstream ovirt-imageio 2.5.1, and clients may compare versions.
string = "2.5.1"
