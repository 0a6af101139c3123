#!/usr/bin/env bash
# The issue-16 shapes measured as a user would: every part a separate process started from the CLI
# (ledger on a fresh Postgres database, routers, nginx as an instant OpenAI-compatible upstream)
# and `wrk` as the external load generator over the OpenAI HTTP front. Ends with `ledger verify`.
#
#   scripts/bench-wrk.sh            # BIN=target/release/syft-router, DURATION=10s, CONNECTIONS=32
#
# LITELLM=path/to/litellm (e.g. a venv with `pip install 'litellm[proxy]'`) adds the LiteLLM proxy
# (2 workers, no database, no accounting) in front of the same nginx upstream, for the
# paid / LiteLLM ratio.
#
# Needs: wrk, nginx (Debian: apt-get install wrk nginx-light), psql, a Postgres server
# (PG=postgres://postgres@127.0.0.1:5432, its default database is used to create a throwaway one).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
BIN=${BIN:-$here/../target/release/syft-router}
PG=${PG:-postgres://postgres@127.0.0.1:5432}
DURATION=${DURATION:-10s}
# Appended to the ledger's database URL, e.g. `?sslmode=disable` (the default, `prefer`, speaks
# TLS to a server that offers it).
DB_QUERY=${DB_QUERY:-}
CONNECTIONS=${CONNECTIONS:-32}
# The services listen on BASE+51 to BASE+112: below Linux's ephemeral range (32768 and up), where
# a port can be taken by any outgoing connection at any time (the script then stopped half-way,
# its closing `ledger verify` never run).
BASE=${BENCH_PORT_BASE:-21100}
ADMIN=bench-admin-key-0123456789
OWNER=owner@bench.example
work=$(mktemp -d)
db=syft_wrk_$$
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    BENCH_NGINX_DIR=$work/nginx "$here/bench-nginx.sh" stop >/dev/null 2>&1 || true
    psql -q "$PG/postgres" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

psql -q "$PG/postgres" -c "CREATE DATABASE $db"
upstream=$(BENCH_NGINX_DIR=$work/nginx "$here/bench-nginx.sh" start 18181)

export SYFT_LEDGER_URL=http://127.0.0.1:$((BASE + 51)) SYFT_LEDGER_ADMIN_KEY=$ADMIN RUST_LOG=error
"$BIN" ledger --database-url "$PG/$db$DB_QUERY" --admin-key "$ADMIN" --grpc-addr 127.0.0.1:$((BASE + 51)) \
    --http-addr 127.0.0.1:$((BASE + 52)) >"$work/ledger.log" 2>&1 &
pids+=($!)
ledger_pid=$!
for _ in $(seq 100); do "$BIN" health --url "$SYFT_LEDGER_URL" >/dev/null 2>&1 && break; sleep 0.1; done

owner_secret=$("$BIN" account create "$OWNER" --json | sed -n 's/.*"secret": *"\([^"]*\)".*/\1/p')
users=()
for i in $(seq 0 63); do
    email=user$i@bench.example
    secret=$("$BIN" account create "$email" --json | sed -n 's/.*"secret": *"\([^"]*\)".*/\1/p')
    "$BIN" account deposit "$email" 1000000 >/dev/null
    token=$(SYFT_SECRET=$secret "$BIN" token issue "$OWNER" --json | sed -n 's/.*"token": *"\([^"]*\)".*/\1/p')
    users+=("$email:$token")
done

router() { # name port pricing-json ledger-url [extra flags...]
    cat >"$work/$1.json" <<CONF
{"name": "$1", "owner_email": "$OWNER", "models": ["bench"],
 "services": [{"type": "chat", "enabled": true, "pricing": $3}],
 "upstream": {"kind": "openai", "base_url": "$upstream"}}
CONF
    SYFT_ROUTER_LEDGER_SECRET=$owner_secret "$BIN" router --config "$work/$1.json" \
        --ledger-url "$4" --grpc-addr "127.0.0.1:$2" --http-addr "127.0.0.1:$(($2 + 1))" \
        "${@:5}" >"$work/$1.log" 2>&1 &
    pids+=($!)
    router_pid[$2]=$!
}
declare -A router_pid
router paid $((BASE + 61)) '{"pricing_type": "per_request", "amount": "0.01"}' "$SYFT_LEDGER_URL"
router free $((BASE + 71)) '{"pricing_type": "free"}' "$SYFT_LEDGER_URL"
# The same free service with a local usage spool: answers released after a local append (synced
# to disk by default, or not: --usage-spool-sync false), rows shipped to the ledger in the
# background (docs/design.md, "Usage rows").
router freespool $((BASE + 101)) '{"pricing_type": "free"}' "$SYFT_LEDGER_URL" --usage-spool "$work/spool"
router freespoolnosync $((BASE + 111)) '{"pricing_type": "free"}' "$SYFT_LEDGER_URL" \
    --usage-spool "$work/spool-nosync" --usage-spool-sync false
router noledger $((BASE + 81)) '{"pricing_type": "free"}' http://127.0.0.1:9
if [ -n "${LITELLM:-}" ]; then
    cat >"$work/litellm.yaml" <<CONF
model_list:
  - model_name: bench
    litellm_params: {model: openai/bench, api_base: "$upstream", api_key: "none"}
CONF
    # No master key: the proxy runs with no auth (and no database, no accounting), which recent
    # LiteLLM versions refuse to start without this switch.
    LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY=true \
    "$LITELLM" --config "$work/litellm.yaml" --host 127.0.0.1 --port $((BASE + 92)) --num_workers 2 \
        >"$work/litellm.log" 2>&1 &
    pids+=($!)
    # LiteLLM takes 10 – 15 s to start on a quiet machine, and more while the ledger and routers
    # start beside it: wait up to 3 minutes, and say so if it never answered.
    litellm_up=false
    for _ in $(seq 360); do
        curl -sf http://127.0.0.1:$((BASE + 92))/health/liveliness >/dev/null && { litellm_up=true; break; }
        sleep 0.5
    done
    if ! $litellm_up; then
        echo "LiteLLM did not start; its log ends with:" >&2
        tail -20 "$work/litellm.log" >&2
        LITELLM=
    fi
fi
# Every router must answer before any shape runs: one that could not start (its port taken) is
# named with its log, instead of a shape measuring refused connections.
for port in "${!router_pid[@]}"; do
    # The router with no ledger is never ready (its ledger is unreachable on purpose).
    [ "$port" = "$((BASE + 81))" ] && continue
    up=false
    for _ in $(seq 100); do
        "$BIN" health --url "http://127.0.0.1:$port" >/dev/null 2>&1 && { up=true; break; }
        kill -0 "${router_pid[$port]}" 2>/dev/null || break
        sleep 0.1
    done
    if ! $up; then
        echo "the router on port $port did not start; its log ends with:" >&2
        tail -5 "$work"/*.log >&2
        exit 1
    fi
done
sleep 1

# CPU time (clock ticks) a process has used, or every process of a command name together.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
ticks_of() { # pids...
    local sum=0 p
    for p in "$@"; do sum=$((sum + $(ticks "$p"))); done
    echo "$sum"
}
# This benchmark's processes only (every `postgres` and `nginx` of the machine was counted, which
# inflated the figures on a shared server): the benchmark database's backends with the server's
# WAL writer, checkpointer and background writer, and the nginx this script started.
pg_pids() {
    psql -tAq "$PG/postgres" -c "SELECT pid FROM pg_stat_activity WHERE datname = '$db' \
        OR backend_type IN ('walwriter', 'checkpointer', 'background writer')"
}
nginx_pids() {
    local master
    master=$(cat "$work/nginx/nginx.pid" 2>/dev/null) || return 0
    echo "$master" $(pgrep -P "$master")
}
hz=$(getconf CLK_TCK)
# Transactions committed in the benchmark's database so far (how well the ledger batches).
commits() { psql -tAq "$PG/postgres" -c "SELECT xact_commit FROM pg_stat_database WHERE datname = '$db'"; }

run() { # label port connections users...
    local label=$1 port=$2 conns=$3
    shift 3
    local joined
    joined=$(IFS=,; echo "$*")
    local out
    # wrk refuses more threads than connections (the c=1 shapes).
    local threads=$((conns < 2 ? conns : 2))
    local rp=${router_pid[$port]:-0}
    local r0 l0 p0 n0 c0
    local pg ng
    pg=$(pg_pids) ng=$(nginx_pids)
    # shellcheck disable=SC2086 # word splitting of the pid lists is intended
    r0=$(ticks "$rp") l0=$(ticks "$ledger_pid") p0=$(ticks_of $pg) n0=$(ticks_of $ng)
    c0=$(commits)
    out=$(SYFT_USERS=$joined wrk -t"$threads" -c"$conns" -d"$DURATION" --latency \
        -s "$here/wrk-chat.lua" "http://127.0.0.1:$((port + 1))" 2>&1)
    local rps p50 p99 non2xx
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    p50=$(awk '$1 == "50%" {print $2}' <<<"$out")
    p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
    non2xx=$(awk '/Non-2xx/ {print $NF}' <<<"$out")
    # CPU per request (µs) by process: where a shape's cost goes (the machine has 2 cores, so
    # 2,000,000 / req/s µs is all there is).
    local total cpu
    total=$(awk '/requests in/ {print $1}' <<<"$out")
    cpu=$(awk -v n="${total:-0}" -v hz="$hz" -v r="$(($(ticks "$rp") - r0))" \
        -v l="$(($(ticks "$ledger_pid") - l0))" -v p="$(($(ticks_of $pg) - p0))" \
        -v x="$(($(ticks_of $ng) - n0))" -v c="$(($(commits) - c0))" 'BEGIN {
            if (n == 0) exit
            f = 1e6 / hz / n
            printf "cpu µs/req: router %d ledger %d postgres %d nginx %d; commits/req %.2f", r * f, l * f, p * f, x * f, c / n
        }')
    printf '  %-36s %10s req/s  p50 %8s  p99 %8s  non-2xx %s  %s\n' "$label" "$rps" "$p50" "$p99" "${non2xx:-0}" "$cpu"
    echo "$rps" >"$work/$label.rps"
}
free_users=()
for u in "${users[@]}"; do free_users+=("${u%%:*}:"); done
echo "wrk shapes over the HTTP front (c=$CONNECTIONS, $DURATION each; nginx upstream):"
run "paid-64" $((BASE + 61)) "$CONNECTIONS" "${users[@]}"
run "paid-1" $((BASE + 61)) "$CONNECTIONS" "${users[0]}"
run "free" $((BASE + 71)) "$CONNECTIONS" "${free_users[@]}"
run "free-spool" $((BASE + 101)) "$CONNECTIONS" "${free_users[@]}"
# Let the spool ship its backlog before the next shape is measured.
sleep 2
run "free-spool-nosync" $((BASE + 111)) "$CONNECTIONS" "${free_users[@]}"
sleep 2
run "free-noledger" $((BASE + 81)) "$CONNECTIONS" "${free_users[@]}"
run "paid-c1" $((BASE + 61)) 1 "${users[@]}"
run "free-c1" $((BASE + 71)) 1 "${free_users[@]}"
if [ -n "${LITELLM:-}" ]; then
    run "litellm" $((BASE + 91)) "$CONNECTIONS" "${free_users[@]}"
fi
# A shape without a figure (wrk failed against it) gives "n/a", not a division by zero.
ratio() {
    awk -v a="$(cat "$work/$1.rps" 2>/dev/null)" -v b="$(cat "$work/$2.rps" 2>/dev/null)" \
        'BEGIN { if (a + 0 > 0 && b + 0 > 0) printf "%.2f", a / b; else printf "n/a" }'
}
echo "ratios: one payer / 64 payers $(ratio paid-1 paid-64) (>= 0.8); free with ledger / without $(ratio free free-noledger) (>= 0.7); free with ledger and spool / without $(ratio free-spool free-noledger), not synced $(ratio free-spool-nosync free-noledger) (>= 0.7); paid / free $(ratio paid-64 free) (>= 0.5)"
if [ -n "${LITELLM:-}" ]; then
    echo "ratio: paid (64 payers) / LiteLLM $(ratio paid-64 litellm) (>= 25)"
fi
for p in "${pids[@]}"; do
    rss=$(awk '/VmHWM/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)
    echo "  $(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | cut -c1-60): peak RSS $((rss / 1024)) MB"
done
for p in "${pids[@]}"; do kill -INT "$p" 2>/dev/null || true; done
wait "${pids[@]}" 2>/dev/null || true
pids=()
"$BIN" ledger verify --database-url "$PG/$db"
