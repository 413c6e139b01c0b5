#!/usr/bin/env bash
# Container health check for every inferq role: GET a health route on the metrics
# listener and succeed only on HTTP 200. Needs nothing but bash (no curl in the image).
#
#   inferq-healthcheck                 # /v2/health/live on the port of INFERQ_METRICS_LISTEN
#   inferq-healthcheck PORT [PATH]     # e.g. inferq-healthcheck 9465 /v2/health/ready
#
# The Dockerfile's HEALTHCHECK runs it; scripts/stack.sh uses it to wait for readiness.
set -euo pipefail

listen="${INFERQ_METRICS_LISTEN:-127.0.0.1:9464}"
port="${1:-${listen##*:}}"
path="${2:-/v2/health/live}"

# The listener may be bound to 0.0.0.0 or a specific address; loopback reaches both
# the wildcard and 127.0.0.1 (the only addresses the shipped settings use).
exec 3<>"/dev/tcp/127.0.0.1/$port"
printf 'GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n' "$path" >&3
read -r -t 5 _ status _ <&3
exec 3<&-
[ "$status" = "200" ]
