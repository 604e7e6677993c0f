#!/bin/bash
# The recipe of the `coi` image. coi-image runs it inside a throwaway builder
# container as root, one step per call: `bash coi-build.sh STEP [ARGS...]`,
# so progress, timing and failures are reported per step. Every step is
# safe to rerun.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

TOOL_USER=code
TOOL_UID=1000
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
NODE_MAJOR=22

apt_install() {
  apt-get install -y --no-install-recommends "$@"
}

# Point name resolution at fixed servers when the one DHCP handed out does
# not answer (a host stub resolver such as 127.0.0.53 leaks into containers).
step_dns_static() {
  rm -f /etc/resolv.conf
  printf 'nameserver %s\n' "$@" > /etc/resolv.conf
  if [ -d /etc/dhcp ]; then
    mkdir -p /etc/dhcp/dhclient-enter-hooks.d
    echo 'make_resolv_conf() { :; }' > /etc/dhcp/dhclient-enter-hooks.d/coi-static-dns
  fi
  if [ -d /etc/systemd/resolved.conf.d ] || command -v resolvectl >/dev/null; then
    mkdir -p /etc/systemd/resolved.conf.d
    printf '[Resolve]\nDNS=%s\n' "$*" > /etc/systemd/resolved.conf.d/coi-static-dns.conf
  fi
}

# The host's own CA certificates (pushed to /usr/local/share/ca-certificates/coi/
# by coi-image) become trusted system-wide, and Node and pip are told to use
# the system store, which they ignore by default.
step_ca_certificates() {
  command -v update-ca-certificates >/dev/null || { apt-get update; apt_install ca-certificates; }
  update-ca-certificates
  cat > /etc/profile.d/coi-ca.sh <<EOT
export NODE_EXTRA_CA_CERTS=$CA_BUNDLE
export SSL_CERT_FILE=$CA_BUNDLE
export REQUESTS_CA_BUNDLE=$CA_BUNDLE
export PIP_CERT=$CA_BUNDLE
EOT
  for var in NODE_EXTRA_CA_CERTS SSL_CERT_FILE REQUESTS_CA_BUNDLE PIP_CERT; do
    grep -q "^$var=" /etc/environment 2>/dev/null || echo "$var=$CA_BUNDLE" >> /etc/environment
  done
}

step_packages() {
  apt-get update
  apt_install sudo tmux git curl ca-certificates build-essential python3 python3-pip \
    python3-venv jq less procps iproute2 openssh-client gnupg unzip xz-utils locales
}

# uid 1000 may already belong to the distribution's default user (ubuntu on
# Ubuntu images): it becomes `code`, so files keep one owner on the host.
step_user() {
  local existing
  existing=$(getent passwd "$TOOL_UID" | cut -d: -f1 || true)
  if [ -n "$existing" ] && [ "$existing" != "$TOOL_USER" ]; then
    usermod -l "$TOOL_USER" -d "/home/$TOOL_USER" -m "$existing"
    groupmod -n "$TOOL_USER" "$(id -gn "$TOOL_USER")"
  elif [ -z "$existing" ]; then
    getent group "$TOOL_UID" >/dev/null || groupadd -g "$TOOL_UID" "$TOOL_USER"
    useradd -u "$TOOL_UID" -g "$TOOL_UID" -m -d "/home/$TOOL_USER" -s /bin/bash "$TOOL_USER"
  fi
  echo "$TOOL_USER ALL=(ALL) NOPASSWD:ALL" > /etc/sudoers.d/coi-code
  chmod 440 /etc/sudoers.d/coi-code
  visudo -cf /etc/sudoers.d/coi-code
  mkdir -p /workspace
  chown "$TOOL_USER:$TOOL_USER" /workspace
}

# Debian 12's Node.js is 18, older than the AI CLIs want (Claude Code asks for
# 22, Gemini CLI for 20). The npm registry ships Node.js itself as
# node-linux-<arch>, so it installs wherever npm reaches, offline mirrors included.
step_node() {
  apt_install nodejs npm
  local arch=""
  case "$(uname -m)" in
    x86_64) arch=x64 ;;
    aarch64) arch=arm64 ;;
  esac
  if [ -n "$arch" ]; then
    npm install -g "node-linux-$arch@$NODE_MAJOR"
    ln -sf "/usr/local/lib/node_modules/node-linux-$arch/bin/node" /usr/local/bin/node
  fi
  node --version
  npm --version
}

step_gh() {
  apt_install gh
}

step_docker() {
  apt_install docker.io
  usermod -aG docker "$TOOL_USER"
  systemctl enable docker.service containerd.service
}

step_tool_npm() {
  npm install -g "$1"
}

step_tool_pip() {
  # Debian 12 and Ubuntu 24.04 mark the system Python as externally managed;
  # the image is disposable and the tool is its whole point.
  pip3 install --break-system-packages "$1" 2>/dev/null || pip3 install "$1"
}

step_tool_script() {
  bash -euo pipefail -c "$1"
}

step_finish() {
  apt-get clean
  rm -rf /var/lib/apt/lists/* /tmp/* /root/.npm /root/.cache
  # Each container gets its own machine id and SSH host keys at first boot.
  truncate -s 0 /etc/machine-id
  rm -f /etc/ssh/ssh_host_*
  find /var/log -type f -exec truncate -s 0 {} +
}

step=${1:?usage: coi-build.sh STEP [ARGS...]}
shift
"step_$step" "$@"
