"""Local virt-builder templates built from Debian's package mirror."""
