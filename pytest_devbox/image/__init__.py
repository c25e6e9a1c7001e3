"""The image cache and how a cached image is made (recipe, virt-builder, index, qemu-img)."""
