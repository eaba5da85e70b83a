#!/bin/sh
# Print the Debian archive this host's apt already uses (the first non-security URI of
# /etc/apt/sources.list.d/*.sources or /etc/apt/sources.list), so builds follow the host's own, reachable
# mirror. No mirror is written in the repo: with none configured, say so and fail.
# Used by plugin/build.sh (the managed plugin's rootfs) and tests/engines/fetch-docker.sh.
uri=$(sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*\).*/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null \
      | grep -v security | head -n1)
[ -n "$uri" ] || uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
      | awk '$1=="deb" && $2 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit}}')
if [ -z "$uri" ]; then
    echo "host-mirror.sh: this host's apt has no Debian archive configured (no deb URI in /etc/apt/sources.list" \
         "or /etc/apt/sources.list.d/); add one, or name a mirror in the variable the caller documents" >&2
    exit 1
fi
echo "$uri"
