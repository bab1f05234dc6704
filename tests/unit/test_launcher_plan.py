"""What ``inferplane up`` starts, decided before anything runs (no process is started here)."""

from __future__ import annotations

from pathlib import Path

from inferplane.cli.launcher import LocalStack, StackConfig


def stack(tmp_path: Path, edge_mode: str = "in-router", **router: str) -> LocalStack:
    return LocalStack(StackConfig(state_dir=tmp_path, ports=dict.fromkeys(StackConfig().ports, 0), executors=2,
                                  router=dict(router), edge_mode=edge_mode), log=lambda m: None)


def test_the_default_router_tokenizes_in_process_so_no_tokenizer_service_starts(tmp_path: Path) -> None:
    assert stack(tmp_path).start_order == ["metering", "executor", "executor_2", "router", "envoy"]


def test_the_rest_edge_runs_in_the_router_or_as_its_own_process(tmp_path: Path) -> None:
    inside = stack(tmp_path)
    assert "gateway" not in inside.start_order
    assert inside._command("router")[-4:-2] == ["serve", "router-gateway"]
    assert inside.cfg.edge_mode == "in-router"  # the default (docs/deployment.md has the measurement)
    separate = stack(tmp_path, edge_mode="separate")
    assert separate.start_order == ["metering", "executor", "executor_2", "router", "gateway", "envoy"]
    assert separate._command("router")[-4:-2] == ["serve", "router"]


def test_a_router_that_encodes_or_decodes_remotely_gets_the_tokenizer_service(tmp_path: Path) -> None:
    for router in ({"tokenize": "remote"}, {"detokenize": "remote"}):
        assert stack(tmp_path, **router).start_order[:2] == ["metering", "tokenizer"]


def test_free_ports_are_distinct_within_a_stack(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Random picks can coincide; the stack never gives one port to two components."""
    import inferplane.cli.launcher as launcher

    picks = iter([30001, 30001, 30002, 30001, *range(30003, 30100)])
    monkeypatch.setattr(launcher, "free_port", lambda: next(picks))
    ports = stack(tmp_path).ports
    assert len(set(ports.values())) == len(ports)


def test_envoy_runs_one_worker_unless_the_edge_settings_say_otherwise(tmp_path: Path) -> None:
    plain = stack(tmp_path / "plain")
    plain.state.mkdir(parents=True)
    plain.write_settings()
    command = plain._command("envoy")
    assert command[command.index("--concurrency") + 1] == "1"
    wide = LocalStack(StackConfig(state_dir=tmp_path / "wide", ports=dict.fromkeys(StackConfig().ports, 0),
                                  edge={"workers": 0}), log=lambda m: None)
    wide.state.mkdir(parents=True)
    wide.write_settings()
    assert "--concurrency" not in wide._command("envoy")  # 0: Envoy's own default, one worker per CPU


def test_envoy_reaches_the_gateway_on_a_unix_socket_in_the_state_dir(tmp_path: Path) -> None:
    import yaml

    from inferplane.edge.envoy import edge_settings, envoy_config

    plan = stack(tmp_path / "s")
    plan.state.mkdir(parents=True)
    plan.write_settings()
    settings = yaml.safe_load(plan.settings_file.read_text())
    sock = str(plan.state / "gateway.sock")
    assert settings["gateway"]["unix_socket"] == sock and settings["gateway"]["port"]  # TCP too (health, metrics)
    clusters = {c["name"]: c for c in envoy_config(edge_settings(plan.settings_file))["static_resources"]["clusters"]}
    endpoint = clusters["gateway"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"] == {"pipe": {"path": sock}} and clusters["gateway"]["type"] == "STATIC"
    assert "upstream_connection_options" not in clusters["gateway"]  # TCP keepalive: not for a pipe
    assert "socket_address" in clusters["router"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0][
        "endpoint"]["address"]

    # a state directory too deep for a Unix socket's address (108 bytes): the gateway's TCP port
    deep = stack(tmp_path / ("d" * 120))
    deep.state.mkdir(parents=True)
    deep.write_settings()
    settings = yaml.safe_load(deep.settings_file.read_text())
    assert settings["gateway"]["unix_socket"] == ""
    assert settings["edge"]["gateway_addr"] == f"127.0.0.1:{settings['gateway']['port']}"
