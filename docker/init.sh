#!/bin/sh
# First start only: a signing key, an operator, and three devices with ready device.toml files.
set -eu
[ -f /data/.initialised ] && exit 0
fleetbus keys generate /data/keys
fleetbus broker user add operator --role operator --out /data/operator.toml \
  --broker-url mqtt://broker:1883 --key /data/keys/publisher.key
for n in 1 2 3; do
  fleetbus device add "dev-$n" --group demo --out "/data/dev-$n.toml" \
    --broker-url mqtt://broker:1883 --pubkey /data/keys/publisher.pub --state-dir "/data/state/dev-$n"
done
touch /data/.initialised
