#!/usr/bin/env bash
# The load check of the hardening issue: N (default 10 000) concurrent connections through one node proxy
# pair, as separate processes (so each stays under a 20 000-fd hard limit): client pod mb-c → its dedicated
# proxy → HBONE → the server pod's proxy → an echo app, in the two-pod topology of ../shared/bench.
#
#   sudo ZTUNNEL_BIN=... ZTUNNEL_SRC=... MESHNODE_BIN=target/release/meshnode [N=10000] bash benches/load_10k.sh
#
# (ZTUNNEL_SRC gives the test CA both systems can use; with SYSTEM=ztunnel the same run measures ztunnel.)
# Every connection is opened and proven with a 1-byte echo and held; then all send one more byte at once and
# every echo is counted. Prints: opened, echoed (must equal N), each proxy's RSS idle, with N open, and its
# peak (VmHWM), and the bytes per connection. Needs: iproute2, iptables, python3.
set -u
here=$(cd "$(dirname "$0")" && pwd)
bench=${BENCH_DIR:-$here/../../shared/bench}
source "$bench/topo.sh"; source "$bench/pair.sh"
N=${N:-10000}
SYSTEM=${SYSTEM:-meshnode}
d=$(mktemp -d /tmp/load10k.XXXX)
trap 'topo_down; rm -rf "$d"' EXIT

cat >"$d/echo.py" <<'PY'
import asyncio, resource, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE); resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
async def handle(r, w):
    while (b := await r.read(4096)):
        w.write(b); await w.drain()
    w.close()
async def main():
    srv = await asyncio.start_server(handle, sys.argv[1], int(sys.argv[2]), backlog=4096)
    async with srv: await srv.serve_forever()
asyncio.run(main())
PY
cat >"$d/load.py" <<'PY'
import asyncio, resource, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE); resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
async def one(sem):
    async with sem:
        r, w = await asyncio.wait_for(asyncio.open_connection(host, port), 30)
        w.write(b"a"); await w.drain()
        assert await asyncio.wait_for(r.readexactly(1), 30) == b"a"
        return r, w
async def main():
    sem = asyncio.Semaphore(256)
    conns = await asyncio.gather(*(one(sem) for _ in range(n)), return_exceptions=True)
    ok = [c for c in conns if not isinstance(c, BaseException)]
    errs = [c for c in conns if isinstance(c, BaseException)]
    print(f"opened={len(ok)} failed={len(errs)}" + (f" first_error={errs[0]!r}" if errs else ""), flush=True)
    sys.stdin.readline()  # hold until told
    for r, w in ok: w.write(b"b")
    async def echo(r):
        try: return await asyncio.wait_for(r.readexactly(1), 60) == b"b"
        except Exception: return False
    got = await asyncio.gather(*(echo(r) for r, _ in ok))
    print(f"echoed={sum(got)}", flush=True)
asyncio.run(main())
PY

rss() { awk '/^VmRSS/ {print $2}' /proc/$1/status; }
hwm() { awk '/^VmHWM/ {print $2}' /proc/$1/status; }
topo_up || { echo "topology failed"; exit 1; }
(ip netns exec $S python3 "$d/echo.py" $SIP 9000 >"$d/echo.log" 2>&1 &)
pair_up "$d" "$SYSTEM" "$SYSTEM" || exit 1
capture_client
pc=$(cat "$d/proxy-c.pid") ps=$(cat "$d/proxy-s.pid")
idle_c=$(rss $pc) idle_s=$(rss $ps)
coproc LOAD { ip netns exec $C python3 "$d/load.py" $SIP 9000 $N 2>&1; }
read -r opened <&"${LOAD[0]}"
open_c=$(rss $pc) open_s=$(rss $ps)
echo go >&"${LOAD[1]}"
read -r echoed <&"${LOAD[0]}"
echo "system=$SYSTEM n=$N $opened $echoed"
for side in c s; do
  p=$([ $side = c ] && echo $pc || echo $ps)
  idle=$([ $side = c ] && echo $idle_c || echo $idle_s)
  open=$([ $side = c ] && echo $open_c || echo $open_s)
  echo "proxy-$side rss_idle_kb=$idle rss_open_kb=$open peak_kb=$(hwm $p) bytes_per_conn=$(( (open - idle) * 1024 / N ))"
done
