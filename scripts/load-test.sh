#!/usr/bin/env bash
# Load test (issue 9): `tinyfleet simulate` as the load generator against `tinyfleet serve`,
# once with the embedded broker (rumqttd) and once with Mosquitto as the broker (serve in
# external-broker mode, Mosquitto authenticating devices from a password file), the same load
# back to back. For each fleet size: connections held over time, summaries/s offered vs stored,
# PUBACK latency, publish-to-visible latency in the API, RSS and CPU of server, broker and
# simulator. Prints a Markdown table; raw data in the output directory.
#
# Usage: scripts/load-test.sh [--sizes 5000,10000,19500] [--brokers rumqttd,mosquitto]
#          [--hold-secs 120] [--interval-ms 10000] [--connect-rate 500] [--connecting 64]
#          [--ramp-timeout-secs 1200] [--per-process 9500] [--per-broker 18000]
#          [--latency-sample 200]
#          [--repeat 1] [--server-nofile N] [--out DIR]
#   --server-nofile N  lowers the open-file limit of serve and Mosquitto to N, to watch each
#                      broker run out of file descriptors without needing that many devices.
#   --brokers: rumqttd (serve's embedded broker); mosquitto (serve in external-broker mode
#              against Mosquitto configured by `tinyfleet broker mosquitto-conf|-acl`; above
#              --per-broker devices, ceil(N / per-broker) edge brokers hold the devices, each
#              bridged to the core with `tinyfleet broker mosquitto-bridge`: one process holds
#              fewer connections than its open-file limit); sinks (the simulator alone against
#              ceil(N / per-broker) bare Mosquitto processes: what the load generator holds).
#   TINYFLEET_BIN=path   use this binary instead of building `cargo build --release`.
#
# What a run does, per size N and broker:
#   1. (once) a server provisions the largest N devices; its data directory is the template
#      every run starts from, so all runs use the same devices and keys.
#   2. a fresh copy of the template; Mosquitto (if that broker) and `tinyfleet serve`.
#   3. ceil(N / per-process) simulator processes (a process holds at most as many connections
#      as its open-file limit), devices starting at --connect-rate in total, at most
#      --connecting CONNECTs in flight; one summary per device every --interval-ms.
#   4. once every device has its CONNACK (or --ramp-timeout-secs passed, or no device
#      connected for 3 minutes), then PUBACKs are back under a second, one more interval:
#      SIGUSR1 marks the steady phase in the simulators, which lasts --hold-secs; then SIGINT
#      ends them (they write their reports) and everything is stopped.
#   A sampler records every 5 s: established connections on the broker port (/proc/net/tcp),
#   RSS and CPU time of each process (/proc), the ingest counters (GET /api/v1/ingest) and the
#   machine's CPU use (/proc/stat), so the noise from other work on the machine shows.
set -euo pipefail
cd "$(dirname "$0")/.."

sizes=5000,10000,19500
brokers=rumqttd,mosquitto
hold=120
interval=10000
rate=500
connecting=64
ramp_timeout=1200
per_process=9500
per_broker=18000
latency_sample=200
repeat=1
server_nofile=""
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --sizes) sizes=$2; shift 2 ;;
    --brokers) brokers=$2; shift 2 ;;
    --hold-secs) hold=$2; shift 2 ;;
    --interval-ms) interval=$2; shift 2 ;;
    --connect-rate) rate=$2; shift 2 ;;
    --connecting) connecting=$2; shift 2 ;;
    --ramp-timeout-secs) ramp_timeout=$2; shift 2 ;;
    --per-process) per_process=$2; shift 2 ;;
    --per-broker) per_broker=$2; shift 2 ;;
    --latency-sample) latency_sample=$2; shift 2 ;;
    --repeat) repeat=$2; shift 2 ;;
    --server-nofile) server_nofile=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    -h|--help) sed -n '2,37p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
target=${CARGO_TARGET_DIR:-target}
out=${out:-$target/load-test/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
out=$(cd "$out" && pwd)
mqtt_port=21883
mosq_port=21884   # Mosquitto's device listener (the core's, when there are edges)
svc_port=21885    # its service listener (serve)
edge_port=21890   # edge brokers (and the sinks): 21890, 21891, ...
api_port=28081
api=http://127.0.0.1:$api_port

log() { echo "[load-test $(date +%H:%M:%S)] $*" | tee -a "$out/load-test.log" >&2; }

if [ -n "${TINYFLEET_BIN:-}" ]; then
  bin=$TINYFLEET_BIN
else
  cargo build --release -q --bin tinyfleet
  bin=$(cd "$target/release" && pwd)/tinyfleet
fi
if [[ ",$brokers," == *",mosquitto,"* || ",$brokers," == *",sinks,"* ]] && ! command -v mosquitto >/dev/null; then
  log "installing mosquitto"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto
fi
for tool in python3 curl; do
  command -v $tool >/dev/null || { echo "needs $tool" >&2; exit 1; }
done

# Every connection is a file descriptor: raise the limit as far as this process may.
ulimit -n 1048576 2>/dev/null || ulimit -n "$(ulimit -Hn)"
nofile=$(ulimit -n)
log "open-file limit per process: $nofile (hard limit $(ulimit -Hn)); ephemeral ports $(tr '\t' '-' < /proc/sys/net/ipv4/ip_local_port_range)"
if [ "$per_process" -gt $((nofile - 200)) ]; then
  per_process=$((nofile - 200))
fi
if [ "$per_broker" -gt $((nofile - 200)) ]; then
  per_broker=$((nofile - 200))
fi

for p in $mqtt_port $mosq_port $svc_port $api_port $(seq $edge_port $((edge_port + 9))); do
  if ss -Htln "( sport = :$p )" | grep -q .; then
    echo "port $p is in use; stop what listens there first" >&2
    exit 1
  fi
done

pids=()
cleanup() {
  for p in "${pids[@]}"; do
    kill "$p" 2>/dev/null || true
  done
  wait 2>/dev/null || true
}
trap cleanup EXIT

# The helpers: sampler, per-run summary and the final table.
cat > "$out/lt.py" <<'PY'
import json, os, sys, time, urllib.request

def read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None

def proc(pid):
    st, stat = read(f"/proc/{pid}/status"), read(f"/proc/{pid}/stat")
    if st is None or stat is None:
        return None
    kv = dict(l.split(":", 1) for l in st.splitlines() if ":" in l)
    f = stat.rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return {"rss_kb": int(kv.get("VmRSS", "0 kB").split()[0]),
            "hwm_kb": int(kv.get("VmHWM", "0 kB").split()[0]),
            "cpu_s": (int(f[11]) + int(f[12])) / tick}

def established(ports):
    """Established TCP connections whose local port is one of `ports` ("1883" or "1883,1884")."""
    n = 0
    hexports = tuple(f":{int(p):04X}" for p in str(ports).split(","))
    for line in (read("/proc/net/tcp") or "").splitlines()[1:]:
        parts = line.split()
        if parts[1].endswith(hexports) and parts[3] == "01":
            n += 1
    return n

def machine():
    f = [int(x) for x in read("/proc/stat").splitlines()[0].split()[1:]]
    idle = f[3] + f[4]
    return {"busy_s": (sum(f) - idle) / os.sysconf("SC_CLK_TCK"),
            "load1": float(read("/proc/loadavg").split()[0])}

def ingest(api, token):
    try:
        req = urllib.request.Request(f"{api}/api/v1/ingest", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.load(r)
    except Exception:
        return None

def sample(out, pidfile, port, api, tokenfile):
    token = None
    with open(out, "a") as o:
        while True:
            if token is None and os.path.exists(tokenfile):
                token = read(tokenfile).strip()
            roles = {}
            for line in (read(pidfile) or "").splitlines():
                role, pid = line.split()
                p = proc(pid)
                if p:
                    r = roles.setdefault(role, {"rss_kb": 0, "hwm_kb": 0, "cpu_s": 0.0, "n": 0})
                    for k in ("rss_kb", "hwm_kb", "cpu_s"):
                        r[k] += p[k]
                    r["n"] += 1
            row = {"unix_ms": int(time.time() * 1000), "conns": established(port), "procs": roles,
                   "machine": machine(), "ingest": ingest(api, token) if token else None}
            o.write(json.dumps(row) + "\n")
            o.flush()
            time.sleep(5)

def shards_now(run_dir):
    """From the simulators' latest progress lines: devices connected (CONNACK), and the
    largest PUBACK p99 of their last 5 s."""
    import re
    connected, ack = 0, 0.0
    for f in sorted(os.listdir(run_dir)):
        if not (f.startswith("shard-") and f.endswith(".log")):
            continue
        last = None
        for line in open(f"{run_dir}/{f}", errors="replace"):
            if " connected, " in line:
                last = line
        if last is None:
            continue
        connected += int(re.search(r"\] (\d+) connected", last).group(1))
        m = re.search(r"PUBACK p99 (\d+) ms", last)
        ack = max(ack, float(m.group(1)) if m else 0.0)
    return connected, ack

def nearest(rows, ms, after):
    c = [r for r in rows if (r["unix_ms"] >= ms if after else r["unix_ms"] <= ms)]
    if not c:
        return None
    return min(c, key=lambda r: abs(r["unix_ms"] - ms))

def merged_quantiles(hists, qs):
    buckets = {}
    for h in hists:
        for edge, n in h.get("buckets", []):
            buckets[edge] = buckets.get(edge, 0) + n
    total = sum(buckets.values())
    if not total:
        return [None for _ in qs]
    out = []
    for q in qs:
        rank, seen = max(1, -(-q * total // 1)), 0
        for edge in sorted(buckets):
            seen += buckets[edge]
            if seen >= rank:
                out.append(edge)
                break
    return out

def summarize(run_dir):
    meta = json.load(open(f"{run_dir}/meta.json"))
    rows = [json.loads(l) for l in open(f"{run_dir}/samples.jsonl")]
    shards = [json.load(open(f"{run_dir}/{f}")) for f in sorted(os.listdir(run_dir))
              if f.startswith("shard-") and f.endswith(".json")]
    a, b = meta["mark_ms"], meta["stop_ms"]
    win = [r for r in rows if a <= r["unix_ms"] <= b]
    r0, r1 = nearest(rows, a, True), nearest(rows, b, False)
    secs = (r1["unix_ms"] - r0["unix_ms"]) / 1000 if r0 and r1 and r1 is not r0 else None
    def acc(r):
        return (r.get("ingest") or {}).get("accepted.summary")
    stored = (acc(r1) - acc(r0)) / secs if secs and acc(r0) is not None and acc(r1) is not None else None
    def cpu(role):
        try:
            return 100 * (r1["procs"][role]["cpu_s"] - r0["procs"][role]["cpu_s"]) / secs
        except (KeyError, TypeError):
            return None
    def peak(role, key="rss_kb"):
        v = [r["procs"][role][key] for r in rows if role in r["procs"]]
        return max(v) / 1024 if v else None
    def at_end(role):
        return r1["procs"][role]["rss_kb"] / 1024 if r1 and role in r1["procs"] else None
    steady = [s.get("steady") or {} for s in shards]
    offered = sum(s.get("summaries_sent_per_second", 0) for s in steady)
    acked = sum(s.get("summaries_acked_per_second", 0) for s in steady)
    ack = merged_quantiles([s.get("ack_latency_ms", {}) for s in steady], [0.5, 0.99])
    # How the broker coped while devices were still connecting.
    ramp_ack = [x.get("ack_p99_ms") for s in shards for x in s.get("timeline", [])
                if x["unix_ms"] < meta["connected_ms"] and x.get("ack_p99_ms") is not None]
    vis = steady[0].get("visible_ms", {}) if steady else {}
    def tl_sum(key):
        return sum((s.get("timeline") or [{}])[-1].get(key, 0) for s in shards)
    lost_in_window = 0
    for s in shards:
        t = [x for x in s.get("timeline", []) if a <= x["unix_ms"] <= b]
        if len(t) >= 2:
            lost_in_window += t[-1]["connections_lost"] - t[0]["connections_lost"]
    conns = [r["conns"] for r in win]
    last_ingest = next((r["ingest"] for r in reversed(rows) if r.get("ingest")), {}) or {}
    # rumqttd's warning when a subscriber fell further behind than its filter log holds.
    skips = sum(1 for l in open(f"{run_dir}/serve.log", errors="replace") if "cursor start jumped" in l)
    machine_cpu = None
    if secs:
        machine_cpu = 100 * (r1["machine"]["busy_s"] - r0["machine"]["busy_s"]) / secs
    ours = sum(c for c in (cpu("serve"), cpu("broker"), cpu("sim")) if c is not None)
    res = {
        "broker": meta["broker"], "edges": meta.get("edges", 0), "devices": meta["devices"], "repeat": meta["repeat"],
        "interval_ms": meta["interval_ms"], "processes": meta["processes"],
        "ramp_secs": meta["ramp_secs"], "ramp_complete": meta["ramp_complete"],
        "connected_at_ramp_end": meta["connected"], "settle_secs": meta["settle_secs"],
        "ramp_ack_p99_max_ms": max(ramp_ack) if ramp_ack else None,
        "conns_at_mark": meta["conns_at_mark"],
        "conns_min": min(conns) if conns else None, "conns_max": max(conns) if conns else None,
        "window_secs": secs,
        "offered_per_s": offered, "acked_per_s": acked, "stored_per_s": stored,
        "ack_p50_ms": ack[0], "ack_p99_ms": ack[1],
        "visible_n": vis.get("count"), "visible_p50_ms": vis.get("p50"), "visible_p99_ms": vis.get("p99"),
        "visible_max_ms": vis.get("max"),
        "visible_expired": sum(s.get("visible_expired", 0) for s in shards),
        "api_rtt_p99_ms": (shards[0].get("api_rtt_ms") or {}).get("p99") if shards else None,
        "connect_failures": tl_sum("connect_failures"), "connections_lost": tl_sum("connections_lost"),
        "summaries_sent_total": tl_sum("summaries_sent"),
        "summaries_accepted_total": last_ingest.get("accepted.summary"),
        "summaries_lost_total": last_ingest.get("lost_summaries"),
        "broker_log_skips": skips,
        "lost_in_window": lost_in_window,
        "serve_rss_mb": at_end("serve"), "serve_peak_mb": peak("serve", "hwm_kb"),
        "broker_rss_mb": at_end("broker"), "broker_peak_mb": peak("broker", "hwm_kb"),
        "sim_rss_mb": at_end("sim"), "sim_peak_mb": peak("sim", "hwm_kb"),
        "serve_cpu_pct": cpu("serve"), "broker_cpu_pct": cpu("broker"), "sim_cpu_pct": cpu("sim"),
        "machine_cpu_pct": machine_cpu,
        "others_cpu_pct": machine_cpu - ours if machine_cpu is not None else None,
        "load1": [r0["machine"]["load1"], r1["machine"]["load1"]] if r0 and r1 else None,
    }
    with open(f"{run_dir}/summary.json", "w") as f:
        json.dump(res, f, indent=1)
    # connections held over time, for plots
    with open(f"{run_dir}/timeline.tsv", "w") as f:
        f.write("secs\tconnections\tserve_rss_mb\tbroker_rss_mb\tsim_rss_mb\taccepted_summaries\n")
        t0 = meta["start_ms"]
        for r in rows:
            p = r["procs"]
            mb = lambda k: f"{p[k]['rss_kb'] / 1024:.0f}" if k in p else ""
            f.write(f"{(r['unix_ms'] - t0) / 1000:.0f}\t{r['conns']}\t{mb('serve')}\t{mb('broker')}\t{mb('sim')}\t{acc(r) or ''}\n")
    return res

def fmt(v, d=0):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{d}f}"
    return f"{v:,}"

def table(out):
    rows = [json.loads(l) for l in open(f"{out}/results.jsonl")]
    print("| broker | devices | held (min of hold) | all connected after | PUBACK p99, worst 5 s of ramp-up | offered/s | stored/s | PUBACK p50 / p99 | publish-to-visible p50 / p99 (samples) | connections lost (hold) | summaries lost, whole run | server RSS | broker RSS | simulator RSS | CPU server / broker / simulator | other load on the machine |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if r["ramp_complete"]:
            ramp = f"{r['ramp_secs']:.0f} s"
        else:
            ramp = f"{fmt(r['connected_at_ramp_end'])} after {r['ramp_secs']:.0f} s"
        broker_rss = fmt(r["broker_rss_mb"]) + " MB" if r["broker_rss_mb"] else "(in server)"
        lost = fmt(r.get("summaries_lost_total"))
        if r.get("summaries_sent_total") and r.get("summaries_lost_total"):
            lost += f" of {fmt(r['summaries_sent_total'])}"
        rack = r.get("ramp_ack_p99_max_ms")
        rack = f"{rack / 1000:,.1f} s" if rack and rack >= 1000 else (f"{rack:.0f} ms" if rack else "-")
        name = r["broker"] + (f" ({r['edges']} edges + core)" if r.get("edges") else "")
        print(f"| {name} | {fmt(r['devices'])} | {fmt(r['conns_min'] - (2 if r['broker'] == 'rumqttd' else 0) if r['conns_min'] else None)} | {ramp} | "
              f"{rack} | "
              f"{fmt(r['offered_per_s'])} | {fmt(r['stored_per_s'])} | "
              f"{fmt(r['ack_p50_ms'], 1)} / {fmt(r['ack_p99_ms'], 1)} ms | "
              f"{fmt(r['visible_p50_ms'])} / {fmt(r['visible_p99_ms'])} ms ({fmt(r['visible_n'])}) | "
              f"{fmt(r['lost_in_window'])} | {lost} | {fmt(r['serve_rss_mb'])} MB | {broker_rss} | "
              f"{fmt(r['sim_rss_mb'])} MB | {fmt(r['serve_cpu_pct'])}% / {fmt(r['broker_cpu_pct'])}% / "
              f"{fmt(r['sim_cpu_pct'])}% | {fmt(r['others_cpu_pct'])}% |")

if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "sample":
        sample(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6])
    elif cmd == "status":
        print(*shards_now(sys.argv[2]))
    elif cmd == "summarize":
        print(json.dumps(summarize(sys.argv[2])))
    elif cmd == "table":
        table(sys.argv[2])
PY

wait_http() {
  for _ in $(seq 1 100); do
    curl -sf "$api/healthz" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "the server did not answer on $api" >&2
  return 1
}

# Stops a process started here and waits for it.
stop() {
  kill -INT "$1" 2>/dev/null || true
  for _ in $(seq 1 100); do
    kill -0 "$1" 2>/dev/null || { wait "$1" 2>/dev/null || true; return 0; }
    sleep 0.1
  done
  kill -KILL "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

# serve's stderr is capped (rumqttd logs every failed accept).
start_serve() { # config log
  (
    [ -n "$server_nofile" ] && ulimit -n "$server_nofile"
    exec "$bin" serve --config "$1"
  ) 2> >(head -c 100000000 > "$2") >/dev/null &
  serve_pid=$!
  pids+=("$serve_pid")
}

max=0
for n in ${sizes//,/ }; do [ "$n" -gt "$max" ] && max=$n; done

# 1. The template: a server with the model registered and the largest fleet provisioned.
tpl=$out/template
rm -rf "$tpl" && mkdir -p "$tpl"
cat > "$tpl/serve.toml" <<EOF
data_dir = "$tpl/data"
[broker]
listen = "127.0.0.1:$mqtt_port"
[api]
listen = "127.0.0.1:$api_port"
EOF
start_serve "$tpl/serve.toml" "$tpl/serve.log"
wait_http
token=$(cat "$tpl/data/api-token")
head -c 4096 /dev/urandom > "$tpl/image.bin"
curl -sf -o /dev/null -X POST -H "Authorization: Bearer $token" --data-binary @"$tpl/image.bin" \
  "$api/api/v1/models/kws/versions/1.0?seq=1&hw=nrf52840"
log "provisioning $max devices"
rm -f "$out/creds.json"
"$bin" simulate --api "$api" --token "$token" --devices "$max" --provision-only \
  --credentials "$out/creds.json" 2>&1 | tail -1
stop "$serve_pid"
# Mosquitto's password file: user:password lines from the credentials, hashed by mosquitto_passwd.
ingest_password=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
bridge_password=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
if [[ ",$brokers," == *",mosquitto,"* || ",$brokers," == *",sinks,"* ]]; then
  python3 -c '
import json, sys
creds = json.load(open(sys.argv[1]))
with open(sys.argv[2], "w") as f:
    for device, c in creds.items():
        f.write(device + ":" + c["password"] + "\n")
    f.write(f"tinyfleet-ingest:{sys.argv[3]}\n")
    f.write(f"tinyfleet-bridge:{sys.argv[4]}\n")
' "$out/creds.json" "$tpl/mosquitto.passwd" "$ingest_password" "$bridge_password"
  printf '%s\n' "$bridge_password" > "$tpl/bridge.password"
  chmod 600 "$tpl/bridge.password"
  chmod 600 "$tpl/mosquitto.passwd"
  mosquitto_passwd -U "$tpl/mosquitto.passwd"
fi

echo "broker devices repeat" > "$out/runs.txt"
: > "$out/results.jsonl"

# Starts Mosquitto with $dir/mosquitto-<name>.conf and waits for it to listen on <port>.
start_mosquitto() { # dir name port
  (
    [ -n "$server_nofile" ] && ulimit -n "$server_nofile"
    exec mosquitto -c "$1/mosquitto-$2.conf"
  ) 2> >(head -c 100000000 > "$1/mosquitto-$2.log") &
  mosqs+=($!)
  pids+=($!)
  echo "broker $!" >> "$1/pids"
  for _ in $(seq 1 50); do ss -Htln "( sport = :$3 )" | grep -q . && break; sleep 0.1; done
}

run() { # broker devices repeat
  local broker=$1 n=$2 rep=$3
  local dir=$out/run-$broker-$n-$rep
  rm -rf "$dir" && mkdir -p "$dir"
  cp -a "$tpl/data" "$dir/data"
  : > "$dir/pids"
  local ports=$mqtt_port endpoints=127.0.0.1:$mqtt_port mosqs=() edges=0
  if [ "$broker" = mosquitto ]; then
    # Mosquitto configured as `tinyfleet broker` prints it (ACL: each device its own topics;
    # client id = username on the device listener; tinyfleet on its own service listener).
    # One process holds fewer devices than its open-file limit: above --per-broker devices,
    # ceil(n / per-broker) edge brokers hold the devices, each bridged to the core (`tinyfleet
    # broker mosquitto-bridge`), where serve subscribes.
    "$bin" broker mosquitto-acl --service-user tinyfleet-ingest --service-user tinyfleet-bridge > "$dir/acl"
    local load_conf="# Load test: rumqttd's window to a subscriber is fixed at 100 (Mosquitto's default: 20).
max_inflight_messages 100
user root
log_dest stderr
log_type error
log_type warning
connection_messages false"
    [ "$n" -gt "$per_broker" ] && edges=$(( (n + per_broker - 1) / per_broker ))
    "$bin" broker mosquitto-conf --password-file "$tpl/mosquitto.passwd" --acl-file "$dir/acl" \
      --device-listener "127.0.0.1:$mosq_port" --service-listener "127.0.0.1:$svc_port" > "$dir/mosquitto-core.conf"
    printf '%s\npersistence_location %s/\n' "$load_conf" "$dir" >> "$dir/mosquitto-core.conf"
    start_mosquitto "$dir" core "$svc_port"
    ports=$mosq_port endpoints=127.0.0.1:$mosq_port
    if [ "$edges" -gt 0 ]; then
      ports="" endpoints=""
      local i p
      for i in $(seq 0 $((edges - 1))); do
        p=$((edge_port + i))
        ports=${ports:+$ports,}$p
        endpoints=${endpoints:+$endpoints,}127.0.0.1:$p
        mkdir -p "$dir/edge-$i"
        {
          echo "per_listener_settings true"
          echo "persistence true"
          echo "persistence_location $dir/edge-$i/"
          echo "max_queued_messages 1000000"
          echo "listener $p 127.0.0.1"
          echo "use_username_as_clientid true"
          echo "allow_anonymous false"
          echo "password_file $tpl/mosquitto.passwd"
          echo "acl_file $dir/acl"
          echo "$load_conf"
          "$bin" broker mosquitto-bridge --name "edge-$i" --core "127.0.0.1:$svc_port" \
            --password-file "$tpl/bridge.password"
        } > "$dir/mosquitto-edge-$i.conf"
        start_mosquitto "$dir" "edge-$i" "$p"
      done
    fi
  elif [ "$broker" = sinks ]; then
    # The simulator alone against ceil(n / per-broker) Mosquitto processes, nothing behind
    # them; serve only answers the API.
    local instances=$(( (n + per_broker - 1) / per_broker )) i p
    ports="" endpoints=""
    for i in $(seq 0 $((instances - 1))); do
      p=$((edge_port + i))
      ports=${ports:+$ports,}$p
      endpoints=${endpoints:+$endpoints,}127.0.0.1:$p
      printf '%s\n' "listener $p 127.0.0.1" "allow_anonymous false" \
        "password_file $tpl/mosquitto.passwd" "persistence false" "max_inflight_messages 100" \
        "user root" "log_dest stderr" "log_type error" "log_type warning" \
        "connection_messages false" > "$dir/mosquitto-sink-$i.conf"
      start_mosquitto "$dir" "sink-$i" "$p"
    done
  fi
  if [ "$broker" = mosquitto ]; then
    cat > "$dir/serve.toml" <<EOF
data_dir = "$dir/data"
[mqtt]
host = "127.0.0.1"
port = $svc_port
username = "tinyfleet-ingest"
password = "$ingest_password"
client_id = "tinyfleet-ingest"
[api]
listen = "127.0.0.1:$api_port"
EOF
  else
    cat > "$dir/serve.toml" <<EOF
data_dir = "$dir/data"
[broker]
listen = "127.0.0.1:$mqtt_port"
[api]
listen = "127.0.0.1:$api_port"
EOF
  fi
  start_serve "$dir/serve.toml" "$dir/serve.log"
  echo "serve $serve_pid" >> "$dir/pids"
  wait_http
  sleep 2
  python3 "$out/lt.py" sample "$dir/samples.jsonl" "$dir/pids" "$ports" "$api" "$dir/data/api-token" &
  local sampler=$!
  pids+=("$sampler")

  local procs=$(( (n + per_process - 1) / per_process ))
  local start_ms=$(date +%s%3N)
  local sims=() skip=0 k=0
  while [ $skip -lt "$n" ]; do
    local count=$(( (n - skip + procs - k - 1) / (procs - k) ))
    local sample=0
    [ $k -eq 0 ] && [ "$broker" != sinks ] && sample=$latency_sample
    "$bin" simulate --api "$api" --token "$(cat "$dir/data/api-token")" --mqtt "$endpoints" \
      --credentials "$out/creds.json" --skip $skip --devices $count \
      --interval-ms "$interval" --connect-rate "$(python3 -c "print($rate / $procs)")" \
      --connecting $(( (connecting + procs - 1) / procs )) --latency-sample $sample \
      --report-every-secs 5 --report "$dir/shard-$k.json" > "$dir/shard-$k.out" 2> "$dir/shard-$k.log" &
    sims+=($!)
    pids+=($!)
    echo "sim $!" >> "$dir/pids"
    skip=$((skip + count))
    k=$((k + 1))
  done
  log "$broker, $n devices: $procs simulator processes started"
  # Ramp-up: until every device has its CONNACK (the simulators' count; a TCP connection the
  # broker has not answered yet does not count).
  local connected=0 ack=0 complete=false best=0 best_at
  local deadline=$(( $(date +%s) + ramp_timeout ))
  best_at=$(date +%s)
  while [ "$(date +%s)" -lt $deadline ]; do
    read -r connected ack < <(python3 "$out/lt.py" status "$dir")
    if [ "$connected" -ge "$n" ]; then complete=true; break; fi
    if [ "$connected" -gt "$best" ]; then best=$connected; best_at=$(date +%s); fi
    # No progress for 3 minutes: the broker has stopped accepting.
    if [ $(( $(date +%s) - best_at )) -ge 180 ]; then
      log "$broker, $n devices: no new connection for 180 s (best $best)"
      break
    fi
    sleep 2
  done
  local connected_ms=$(date +%s%3N)
  local ramp_ms=$(( connected_ms - start_ms )) ramp_connected=$connected
  log "$broker, $n devices: $connected connected after $((ramp_ms / 1000)) s (complete: $complete)"
  # Settling: a broker may still be working through the last connections' subscriptions (and
  # the messages queued behind them); wait until PUBACKs are back under a second.
  local settle_deadline=$(( $(date +%s) + 600 ))
  sleep 6
  while [ "$(date +%s)" -lt $settle_deadline ]; do
    read -r connected ack < <(python3 "$out/lt.py" status "$dir")
    python3 -c "import sys; sys.exit(0 if float('$ack') < 1000 else 1)" && break
    sleep 5
  done
  local settle_s=$(( ($(date +%s%3N) - connected_ms) / 1000 ))
  log "$broker, $n devices: settled after $settle_s s (PUBACK p99 of the last 5 s: $ack ms)"
  sleep $(( (interval + 999) / 1000 ))
  local conns
  conns=$(python3 -c "import sys; sys.path.insert(0, '$out'); import lt; print(lt.established('$ports'))")
  local mark_ms=$(date +%s%3N)
  kill -USR1 "${sims[@]}"
  sleep "$hold"
  local stop_ms=$(date +%s%3N)
  for s in "${sims[@]}"; do kill -INT "$s" 2>/dev/null || true; done
  for s in "${sims[@]}"; do wait "$s" 2>/dev/null || true; done
  sleep 5
  kill "$sampler" 2>/dev/null || true
  wait "$sampler" 2>/dev/null || true
  stop "$serve_pid"
  local m
  for m in "${mosqs[@]}"; do stop "$m"; done
  cat > "$dir/meta.json" <<EOF
{"broker": "$broker", "edges": $edges, "devices": $n, "repeat": $rep, "interval_ms": $interval, "processes": $procs,
 "start_ms": $start_ms, "mark_ms": $mark_ms, "stop_ms": $stop_ms, "ramp_secs": $((ramp_ms / 1000)),
 "ramp_complete": $complete, "connected": $ramp_connected, "connected_ms": $connected_ms,
 "settle_secs": $settle_s, "conns_at_mark": $conns}
EOF
  python3 "$out/lt.py" summarize "$dir" >> "$out/results.jsonl"
  rm -rf "$dir/data"
  log "$broker, $n devices: done ($(tail -1 "$out/results.jsonl" | cut -c1-300))"
}

for rep in $(seq 1 "$repeat"); do
  for n in ${sizes//,/ }; do
    for broker in ${brokers//,/ }; do
      run "$broker" "$n" "$rep"
    done
  done
done

{
  echo "tinyfleet load test: sizes $sizes, interval ${interval} ms, hold ${hold} s, connect rate $rate/s, $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GB, open-file limit $nofile${server_nofile:+ (server and broker: $server_nofile)}"
  echo
  python3 "$out/lt.py" table "$out"
} | tee "$out/results.md"
