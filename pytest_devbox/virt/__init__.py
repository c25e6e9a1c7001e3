"""libvirt: domains and their XML, QEMU's user, memory admission, remote volumes."""
