#!/usr/bin/env python3
"""Trim a Debian root (debootstrap + the /opt/vpcnet venv) down to what the vpcnet plugin runs.

    python3 plugin/trim.py ROOT

Whole Debian packages are removed by their dpkg file lists (no maintainer scripts run): package
management (the rootfs is rebuilt, never upgraded in place), shells and utilities (the entrypoint is
Python; vpcnet runs only iptables), PAM/login, filesystems, time zones, Kerberos/NIS. Then docs, the
parts of the Python standard library nothing imports at run time, pip/setuptools in the venv, and
botocore's models of services other than EC2/STS/SSO. What stays is listed in /opt/vpcnet/MANIFEST.
plugin/build.sh checks afterwards that every kept binary and extension module still finds its libraries
and that vpcnet imports. This file's content is part of the cache key of the trimmed layer.
"""
from __future__ import annotations

import glob
import os
import shutil
import sys

DROP_PACKAGES = """
apt libapt-pkg6.0 gpgv debian-archive-keyring debconf adduser dpkg
libgnutls30 libp11-kit0 libtasn1-6 libunistring2 libidn2-0 libhogweed6 libnettle8 libgmp10 libgcrypt20
libgpg-error0 libstdc++6 libdb5.3 e2fsprogs libext2fs2 libss2 logsave login passwd libpam-modules
libpam-modules-bin libpam-runtime libpam0g libsemanage2 libsemanage-common libsepol2 libaudit1
libaudit-common libcap-ng0 libsystemd0 libudev1 liblz4-1 libxxhash0 libzstd1 util-linux util-linux-extra
mount libmount1 libblkid1 libsmartcols1 bsdutils sysvinit-utils init-system-helpers ncurses-bin
ncurses-base tzdata perl-base bash coreutils diffutils findutils grep sed mawk gzip tar hostname
debianutils base-passwd openssl python3-pip-whl python3-setuptools-whl python3-lib2to3 python3-distutils
python3.11-venv python3-venv libseccomp2 libselinux1 libpcre2-8-0 libacl1 libattr1 libbz2-1.0 liblzma5
libdebconfclient0 libnsl2 libtirpc3 libtirpc-common libgssapi-krb5-2 libkrb5-3 libk5crypto3
libkrb5support0 libkeyutils1 libcom-err2
""".split()

# paths (globs) under the root
DROP_PATHS = """
var/lib/dpkg var/lib/apt var/cache/* var/log/* etc/apt etc/dpkg tmp/* var/tmp/* root/.cache
usr/share/doc usr/share/man usr/share/info usr/share/locale usr/share/lintian usr/share/bug
usr/share/python-wheels usr/share/zoneinfo usr/share/terminfo usr/share/tabset usr/lib/terminfo
usr/share/i18n usr/lib/*-linux-gnu/gconv
usr/lib/python3.*/ensurepip usr/lib/python3.*/lib2to3 usr/lib/python3.*/pydoc_data
usr/lib/python3.*/idlelib usr/lib/python3.*/turtledemo usr/lib/python3.*/test
usr/lib/python3.*/unittest/test usr/lib/python3.*/distutils usr/lib/python3.*/venv
usr/lib/python3.*/lib-dynload/_dbm.* usr/lib/python3.*/lib-dynload/nis.*
usr/lib/python3.*/lib-dynload/_test*.so usr/lib/python3.*/lib-dynload/xxlimited*.so
usr/lib/python3.*/lib-dynload/_xx*.so usr/lib/python3.*/lib-dynload/_ctypes_test.*
usr/lib/python3.*/lib-dynload/ossaudiodev.*
opt/vpcnet/bin/activate* opt/vpcnet/bin/Activate.ps1 opt/vpcnet/bin/pip*
opt/vpcnet/lib/python3.*/site-packages/pip opt/vpcnet/lib/python3.*/site-packages/pip-*.dist-info
opt/vpcnet/lib/python3.*/site-packages/setuptools opt/vpcnet/lib/python3.*/site-packages/setuptools-*
opt/vpcnet/lib/python3.*/site-packages/pkg_resources opt/vpcnet/lib/python3.*/site-packages/_distutils_hack
opt/vpcnet/lib/python3.*/site-packages/distutils-precedence.pth
opt/vpcnet/lib/python3.*/site-packages/*/tests
opt/vpcnet/lib/python3.*/site-packages/netaddr/eui/*.txt opt/vpcnet/lib/python3.*/site-packages/netaddr/eui/*.idx
""".split()

BOTOCORE_KEEP = {"ec2", "sts", "sso", "sso-oidc"}


def _rm(path: str) -> None:
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


def installed_packages(root: str) -> dict[str, str]:
    """Package -> version from dpkg's status file (no dpkg-query needed)."""
    out, pkg, version, ok = {}, None, None, False
    with open(os.path.join(root, "var/lib/dpkg/status"), encoding="utf-8") as fh:
        for line in list(fh) + ["\n"]:
            if line.startswith("Package: "):
                pkg = line.split(":", 1)[1].strip()
            elif line.startswith("Version: "):
                version = line.split(":", 1)[1].strip()
            elif line.startswith("Status: "):
                ok = line.split()[-1] == "installed"
            elif not line.strip():
                if pkg and ok:
                    out[pkg] = version or ""
                pkg, version, ok = None, None, False
    return out


def drop_packages(root: str, packages: list[str]) -> None:
    info = os.path.join(root, "var/lib/dpkg/info")
    for pkg in packages:
        for listing in glob.glob(os.path.join(info, pkg + ".list")) + glob.glob(os.path.join(info, pkg + ":*.list")):
            with open(listing, encoding="utf-8", errors="surrogateescape") as fh:
                for line in fh:
                    path = root + line.rstrip("\n")
                    if os.path.isdir(path):          # directories, and /bin -> usr/bin style links
                        continue
                    if os.path.islink(path) or os.path.isfile(path):
                        os.unlink(path)


def trim_botocore(root: str) -> None:
    for data in glob.glob(os.path.join(root, "opt/vpcnet/lib/python3.*/site-packages/botocore/data")):
        for svc in os.listdir(data):
            path = os.path.join(data, svc)
            if not os.path.isdir(path):
                continue
            if svc not in BOTOCORE_KEEP:
                shutil.rmtree(path)
                continue
            versions = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
            for old in versions[:-1]:
                shutil.rmtree(os.path.join(path, old))
            if versions:
                examples = os.path.join(path, versions[-1], "examples-1.json")
                if os.path.exists(examples):
                    os.unlink(examples)


def remove_empty_dirs(root: str) -> None:
    for top in ("usr/share", "usr/lib", "var/lib"):
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, top), topdown=False):
            if not os.listdir(dirpath) and not os.path.islink(dirpath):
                os.rmdir(dirpath)


def python_packages(root: str) -> list[str]:
    return sorted(os.path.basename(d)[: -len(".dist-info")] for d in
                  glob.glob(os.path.join(root, "opt/vpcnet/lib/python3.*/site-packages/*.dist-info")))


def trim(root: str) -> None:
    packages = installed_packages(root)
    drop = [p for p in DROP_PACKAGES if p in packages]
    drop_packages(root, drop)
    for pattern in DROP_PATHS:
        for path in glob.glob(os.path.join(root, pattern)):
            _rm(path)
    trim_botocore(root)
    remove_empty_dirs(root)
    kept = {p: v for p, v in packages.items() if p not in DROP_PACKAGES}
    with open(os.path.join(root, "opt/vpcnet/MANIFEST"), "w") as fh:
        fh.write("# Debian packages kept in the vpcnet plugin rootfs (others removed: see plugin/trim.py)\n")
        fh.writelines(f"{p} {v}\n" for p, v in sorted(kept.items()))
        fh.write("# Python packages in /opt/vpcnet\n")
        fh.writelines(f"{p}\n" for p in python_packages(root))


if __name__ == "__main__":
    if len(sys.argv) != 2 or not os.path.isdir(os.path.join(sys.argv[1], "var/lib/dpkg")):
        sys.exit("usage: trim.py ROOT  (a Debian root with /var/lib/dpkg)")
    trim(sys.argv[1])
