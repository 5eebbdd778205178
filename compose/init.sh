#!/bin/sh
# The compose demo's one-shot init service: a mesh CA, a certificate per agent and a gossip key. It runs
# before the agents (depends_on: service_completed_successfully) and again on every `up`; files that exist are
# kept, so the agents' identities survive restarts (`docker-compose down -v` removes both volumes).
#   /ca   the CA, with its private key: mounted here only, never by an agent
#   /pki  what the agents mount read-only: ca.crt, node-X/node-X.{crt,key}, gossip.keys
set -eu
umask 077
if [ ! -f /ca/ca.crt ]; then
  meshd ca init --trust-domain compose.mesh --out /ca
fi
cp /ca/ca.crt /pki/ca.crt
for node in node-a node-b node-c; do
  if [ ! -f "/pki/$node/$node.crt" ]; then
    meshd cert issue --ca /ca --node "$node" --out "/pki/$node"
  fi
done
if [ ! -s /pki/gossip.keys ]; then
  meshd gossip keygen > /pki/gossip.keys.new
  mv /pki/gossip.keys.new /pki/gossip.keys
fi
chmod 0644 /pki/ca.crt
echo "init: certificates for node-a node-b node-c and the gossip keyring are ready"
