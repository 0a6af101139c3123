#!/usr/bin/env bash
# An instant OpenAI-compatible upstream for `syft-router bench router --upstream-url`: nginx
# answering every POST /v1/chat/completions with one canned chat completion (no model, no I/O).
#
#   scripts/bench-nginx.sh start [port]   # prints the upstream URL (http://127.0.0.1:<port>/v1)
#   scripts/bench-nginx.sh stop
#
# Needs nginx (Debian: apt-get install nginx-light). State lives in ${BENCH_NGINX_DIR:-/tmp/syft-bench-nginx}.
set -euo pipefail
dir=${BENCH_NGINX_DIR:-/tmp/syft-bench-nginx}
cmd=${1:-start}
port=${2:-18080}
case "$cmd" in
start)
    mkdir -p "$dir/logs"
    cat > "$dir/nginx.conf" <<CONF
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/logs/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    server {
        listen 127.0.0.1:$port;
        location = /v1/chat/completions {
            default_type application/json;
            return 200 '{"id":"chatcmpl-nginx","object":"chat.completion","created":0,"model":"bench","choices":[{"index":0,"message":{"role":"assistant","content":"ok, here is the answer"},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":6,"total_tokens":18}}';
        }
        location = /v1/models {
            default_type application/json;
            return 200 '{"object":"list","data":[{"id":"bench","object":"model"}]}';
        }
    }
}
CONF
    nginx -p "$dir" -c "$dir/nginx.conf"
    echo "http://127.0.0.1:$port/v1"
    ;;
stop)
    [ -f "$dir/nginx.pid" ] && nginx -p "$dir" -c "$dir/nginx.conf" -s stop
    ;;
*)
    echo "usage: $0 start [port] | stop" >&2
    exit 2
    ;;
esac
