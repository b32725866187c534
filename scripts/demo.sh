#!/usr/bin/env bash
# weft's main job: set the machine up, build, and run the seed demo over `weft up` — a whole
# cluster on this machine (its nodes are network namespaces on a private underlay; nothing in
# the machine's own namespace, routes or firewall is touched), driven with the real kubectl:
# deploy, expose, scale, rolling update, rollback, self-heal, describe, logs, exec and a
# NetworkPolicy. See scripts/seed-demo.sh for the sequence. Everything is removed at the end.
set -euo pipefail
export PATH="$HOME/.cargo/bin:$PATH"
cd "$(dirname "$0")/.."

bash scripts/setup.sh
cargo build --release --locked --workspace
WEFT_BIN="$PWD/target/release" exec bash scripts/seed-demo.sh
