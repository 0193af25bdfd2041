"""Fail when Cargo.toml's rust-version is below a locked dependency's.

Reads `cargo metadata --format-version 1 --locked` on stdin.
"""
import json
import sys


def version(s):
    parts = [int(x) for x in s.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))


m = json.load(sys.stdin)
ours = next(p for p in m["packages"] if p["id"] in m["workspace_members"])
deps = [p for p in m["packages"] if p.get("rust_version") and p["id"] not in m["workspace_members"]]
need = max(deps, key=lambda p: version(p["rust_version"]))
print("sluice declares rust-version %s; the highest a locked dependency needs is %s (%s %s)"
      % (ours["rust_version"], need["rust_version"], need["name"], need["version"]))
sys.exit(0 if version(ours["rust_version"]) >= version(need["rust_version"]) else 1)
