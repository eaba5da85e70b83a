#!/opt/vpcnet/bin/python -I
"""Entrypoint of the vpcnet managed plugin (installed as /usr/local/sbin/vpcnet-entrypoint).

1. Check the configuration (the plugin's `Env`): a bad setting exits here with one clear line, before
   any socket exists, so `docker plugin enable` fails instead of enabling a plugin that is not there.
2. Bind the plugin socket at once and hand it to `vpcnet serve` the way systemd socket activation does
   (LISTEN_FDS/LISTEN_PID, fd 3; gunicorn adopts it). Docker checks a managed plugin by dialing its
   socket 0.5 s after starting it, then every 3 s: binding within ~0.1 s of start makes `docker plugin
   enable` return in well under a second, whatever the imports, the datapath restore or a slow cloud
   cost afterwards (connections wait in the listen backlog meanwhile).
3. Use the iptables backend the host's Docker uses (legacy or nft: whichever holds more rules; on a tie
   the image's default, which build.sh set to the build host's backend), for ip6tables too (vpcnet's
   IPv6 guard goes beside the IPv4 rules, in the same backend), then exec `vpcnet serve`.
"""
import os
import socket
import subprocess
import sys

VPCNET = "/opt/vpcnet/bin/vpcnet"
LISTEN_FD = 3                      # SD_LISTEN_FDS_START
# Each tool the plugin runs, and its name in a backend: /usr/sbin/<family>-<mode><suffix>
# (iptables-legacy-save, not iptables-save-legacy).
BACKEND_TOOLS = {f"{family}{suffix}": (family, suffix) for family in ("iptables", "ip6tables")
                 for suffix in ("", "-save", "-restore")}


def check_config():
    from vpcnet import config

    try:
        return config.load()
    except config.ConfigError as exc:
        print(f"vpcnet: configuration error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)


def bind(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    old = os.umask(0o117)          # socket 0660, as vpcnet serve makes it
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        sock.listen(2048)
    finally:
        os.umask(old)
    fd = sock.detach()
    if fd != LISTEN_FD:
        os.dup2(fd, LISTEN_FD, inheritable=True)
        os.close(fd)
    else:
        os.set_inheritable(fd, True)
    os.environ["LISTEN_FDS"] = "1"
    os.environ["LISTEN_PID"] = str(os.getpid())      # exec keeps the pid


def rule_count(tool: str) -> int:
    try:
        out = subprocess.run([tool], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("-"))


def pick_iptables() -> None:
    legacy, nft = rule_count("iptables-legacy-save"), rule_count("iptables-nft-save")
    if legacy == nft:
        return
    mode = "legacy" if legacy > nft else "nft"
    for tool, (family, suffix) in BACKEND_TOOLS.items():
        link, target = f"/usr/local/sbin/{tool}", f"/usr/sbin/{family}-{mode}{suffix}"
        try:
            if os.path.realpath(f"/usr/sbin/{tool}") == os.path.realpath(target):
                if os.path.lexists(link):
                    os.unlink(link)
            elif os.path.realpath(link) != os.path.realpath(target):
                tmp = link + ".new"
                if os.path.lexists(tmp):
                    os.unlink(tmp)
                os.symlink(target, tmp)
                os.replace(tmp, link)
        except OSError as exc:     # a read-only rootfs: keep the image's default
            print(f"vpcnet-entrypoint: cannot select iptables-{mode}: {exc}", file=sys.stderr)
            return
    print(f"vpcnet-entrypoint: using iptables-{mode} (the host's rules are there)", file=sys.stderr)


def main() -> None:
    os.environ["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    args = sys.argv[1:] or ["serve"]
    if args[0] == "serve":
        cfg = check_config()
        if "LISTEN_FDS" not in os.environ:
            bind(cfg.socket)
        pick_iptables()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(VPCNET, [VPCNET, *args])


if __name__ == "__main__":
    main()
