#!/usr/bin/env bash
# Certificates and the gossip key for meshd on Docker Swarm (swarm-stack.yml), made with the meshd image on a
# manager node:
#   compose/swarm-pki.sh DIR
#     DIR/ca/ca.crt, ca.key        the mesh CA: keep ca.key off the hosts (made once, kept on later runs)
#     DIR/gossip.keys              the gossip keyring (made once)
#     DIR/hosts/NODE_ID/           per Swarm node: ca.crt, node.crt, node.key, gossip.keys
# Copy each DIR/hosts/NODE_ID/ to that node (the stack mounts $MESHD_SWARM_PKI, default /etc/meshd/pki); this
# node's own directory can be mounted where it is. Run it again after adding nodes: existing files are kept.
# MESHD_TAG picks the image (default local).
set -euo pipefail
dir=${1:?usage: swarm-pki.sh DIR}
tag=${MESHD_TAG:-local}
mkdir -p "$dir/ca" "$dir/hosts"
dir=$(cd "$dir" && pwd)
meshd() { docker run --rm --network none -v "$dir:/out" "meshd:$tag" "$@"; }

[ -f "$dir/ca/ca.crt" ] || meshd ca init --trust-domain swarm.mesh --out /out/ca >/dev/null
if [ ! -s "$dir/gossip.keys" ]; then
  meshd gossip keygen >"$dir/gossip.keys.new"
  mv "$dir/gossip.keys.new" "$dir/gossip.keys"
fi
nodes=$(docker node ls -q)
[ -n "$nodes" ] || { echo "swarm-pki.sh: no Swarm nodes (run it on a manager)" >&2; exit 1; }
for id in $nodes; do
  host="$dir/hosts/$id"
  if [ ! -f "$host/node.crt" ]; then
    meshd cert issue --ca /out/ca --node "$id" --out "/out/hosts/$id" >/dev/null
    mv "$host/$id.crt" "$host/node.crt"
    mv "$host/$id.key" "$host/node.key"
  fi
  cp "$dir/ca/ca.crt" "$host/ca.crt"
  cp "$dir/gossip.keys" "$host/gossip.keys"
  chmod 0600 "$host/node.key" "$host/gossip.keys"
  echo "swarm-pki.sh: $host"
done
