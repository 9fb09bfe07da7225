"""One harness for what tests, load tests and benchmarks start: child processes, ports, Nginx,
Prometheus, Redis. Each was written once per script before; one copy keeps them alike (the same
port rule, the same clean-up of a process group).

- `processes`: `spawn(command, output=Path|file|PIPE|DEVNULL, cwd=, env=, stdin=, user=)` starts
  a command as the leader of a new session (stderr with stdout; stdin /dev/null unless given,
  None inherits); `stop(proc, first=SIGTERM, grace=15, whole_group=False)` signals it, waits up
  to the grace, SIGKILLs its group and reaps it, returning the exit code; `kill_group(pgid)`;
  `group_alive(pgid)`.
- `ports`: `free_port()`, a free loopback port below the ephemeral range (see its docstring);
  `port_open(port, timeout, alive=)`, waiting until something listens.
- `nginx`: `self_signed(directory)`, `render_nginx(conf_path, run_dir, **settings)` (the
  nginx/render.py settings), `nginx_command(conf, error_log)`.
- `prometheus`: `prometheus_config(jobs, interval, rule_files)`, `prometheus_command(config, data,
  listen)`.
- `redis`: `redis_command(port, directory, binary)` (flags from deploy/redisconf.py).
- `wire`: exact bytes to 127.0.0.1:port and the reply, every read bounded: `exchange`,
  `read_until_closed`, `parse_responses`, `Reply`, `Response`; WebSocket `frame`, `close_frame`,
  `parse_frames`, `RawWebSocket`.
"""
