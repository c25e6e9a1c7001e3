"""The script virt-customize runs inside an imported cloud image (image/cloud_import.py):
machine-id and SSH host keys reset, cloud-init disabled, DHCP for the image's own network
stack, host keys made at boot where sshd does not, kernel messages on the serial console.
"""

from __future__ import annotations

# Run inside the guest by virt-customize (`run`): POSIX sh, no bashisms, every step a
# no-op where the guest lacks what it changes. DHCP on the first NIC: the stack the image
# itself uses, in this order: netplan (Ubuntu, Debian 12+ cloud images), NetworkManager
# (the RHEL family, Fedora; a keyfile NetworkManager ignores unless only root may read it:
# nm-settings-keyfile(5)), systemd-networkd, ifupdown (older Debian).
NEUTRALISE_SCRIPT = r"""#!/bin/sh
set -eu
: > /etc/machine-id
rm -f /var/lib/dbus/machine-id /etc/ssh/ssh_host_*
# @CLOUD_INIT@ (the benchmark keeps it, to show what it costs)
if [ -d /etc/cloud ]; then
    touch /etc/cloud/cloud-init.disabled
fi
# @END@

if command -v netplan >/dev/null 2>&1; then
    mkdir -p /etc/netplan
    cat > /etc/netplan/90-devbox-dhcp.yaml <<'EOF'
network:
  version: 2
  ethernets:
    devbox-nic:
      match:
        name: "e*"
      dhcp4: true
EOF
    chmod 600 /etc/netplan/90-devbox-dhcp.yaml
    echo "devbox-import: network by netplan"
elif [ -d /etc/NetworkManager ] && command -v NetworkManager >/dev/null 2>&1; then
    mkdir -p /etc/NetworkManager/system-connections
    cat > /etc/NetworkManager/system-connections/devbox-dhcp.nmconnection <<'EOF'
[connection]
id=devbox-dhcp
type=ethernet
autoconnect=true

[ipv4]
method=auto

[ipv6]
method=auto
EOF
    chmod 600 /etc/NetworkManager/system-connections/devbox-dhcp.nmconnection
    echo "devbox-import: network by NetworkManager"
elif [ -x /lib/systemd/systemd-networkd ] || [ -x /usr/lib/systemd/systemd-networkd ]; then
    mkdir -p /etc/systemd/network
    printf '[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n' \
        > /etc/systemd/network/80-devbox-dhcp.network
    systemctl enable systemd-networkd.service
    echo "devbox-import: network by systemd-networkd"
elif [ -f /etc/network/interfaces ]; then
    mkdir -p /etc/network/interfaces.d
    for nic in eth0 ens3 enp1s0; do
        printf 'allow-hotplug %s\niface %s inet dhcp\n' "$nic" "$nic"
    done > /etc/network/interfaces.d/90-devbox-dhcp
    grep -q 'interfaces.d' /etc/network/interfaces \
        || echo 'source /etc/network/interfaces.d/*' >> /etc/network/interfaces
    echo "devbox-import: network by ifupdown"
else
    echo "devbox-import: no network stack found" >&2
fi

# Debian's and Ubuntu's ssh.service fail without host keys and do not make them; the
# RHEL family's sshd-keygen does. ssh-keygen -A makes only the missing ones.
if command -v ssh-keygen >/dev/null 2>&1 && [ -d /etc/systemd/system ]; then
    cat > /etc/systemd/system/devbox-ssh-keygen.service <<'EOF'
[Unit]
Description=Generate missing SSH host keys
Before=ssh.service sshd.service ssh.socket
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A
RemainAfterExit=yes

[Install]
WantedBy=multi-user.target
EOF
    systemctl enable devbox-ssh-keygen.service
fi

# Kernel messages on the serial console, which our console logs read.
if ! grep -rqs 'console=ttyS0' /etc/default/grub /boot/grub/grub.cfg /boot/grub2/grub.cfg \
        /boot/loader/entries /boot/extlinux/extlinux.conf /etc/kernel/cmdline; then
    if command -v grubby >/dev/null 2>&1; then
        grubby --update-kernel=ALL --args='console=tty0 console=ttyS0,115200n8'
    elif [ -f /etc/default/grub ] && command -v update-grub >/dev/null 2>&1; then
        sed -i 's/^GRUB_CMDLINE_LINUX="/&console=tty0 console=ttyS0,115200n8 /' /etc/default/grub
        update-grub
    else
        echo "devbox-import: no serial console configured" >&2
    fi
fi
"""


def neutralise_script(*, keep_cloud_init: bool = False) -> str:
    """The script; ``keep_cloud_init`` (benchmarks/bench_cloud.py) leaves cloud-init on."""
    if not keep_cloud_init:
        return NEUTRALISE_SCRIPT
    head, rest = NEUTRALISE_SCRIPT.split("# @CLOUD_INIT@", 1)
    return head + rest.split("# @END@", 1)[1]
