"""Config parsing and the CLI's promise: one line naming file and key, exit 2, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from exporter.config import DEFAULT_SOCKET_GLOB, ConfigError, load_file, parse
from exporter.model.collectors import DEFAULT_COLLECTORS
from tests.support.procs import REPO

GOOD = """
web: {listen_address: "127.0.0.1:9999", telemetry_path: /m}
log: {level: debug, format: json}
qmp:
  sockets: [/run/a.qmp]
  globs: ["/run/vms/*.qmp"]
  labels:
    "/run/vms/*.qmp": {tenant: blue}
  poll_interval_seconds: 2
policy: {required: [werror], max_timeout_seconds: 60, require_nonzero_timeout: true}
hang: {state_file: /var/lib/x/state.json, journal_file: /var/lib/x/hangs.jsonl, journal_max_bytes: 1048576}
"""


def test_full_config(tmp_path: Path) -> None:
    p = tmp_path / "c.yml"
    p.write_text(GOOD)
    cfg = load_file(str(p))
    assert cfg.listen_address == "127.0.0.1:9999"
    assert cfg.telemetry_path == "/m"
    assert (cfg.log_level, cfg.log_format) == ("debug", "json")
    assert cfg.qmp.sockets == ("/run/a.qmp",)
    assert cfg.qmp.labels == {"/run/vms/*.qmp": {"tenant": "blue"}}
    assert cfg.qmp.poll_interval_seconds == 2.0
    assert cfg.policy.required == ("werror",)
    assert cfg.policy.max_timeout_seconds == 60.0
    assert cfg.policy.require_nonzero_timeout is True
    assert cfg.hang.state_file == "/var/lib/x/state.json"
    assert (cfg.hang.journal_file, cfg.hang.journal_max_bytes) == ("/var/lib/x/hangs.jsonl", 1048576)


def test_default_glob_only_without_explicit_sockets() -> None:
    assert parse(None, "x").socket_patterns() == ((), (DEFAULT_SOCKET_GLOB,))
    assert parse({"qmp": {"sockets": ["/a"]}}, "x").socket_patterns() == (("/a",), ())


@pytest.mark.parametrize(
    ("doc", "key"),
    [
        ("[1, 2]", "(top level)"),
        ("webb: {}", "webb"),
        ("web: {listen_address: 9738}", "web.listen_address"),
        ("web: {listen_address: 'localhost'}", "web.listen_address"),
        ("web: {telemetry_path: metrics}", "web.telemetry_path"),
        ("log: {level: verbose}", "log.level"),
        ("log: {format: xml}", "log.format"),
        ("qmp: {sockets: /run/a.qmp}", "qmp.sockets"),
        ("qmp: {globs: [1]}", "qmp.globs[0]"),
        ("qmp: {poll_interval_seconds: 0}", "qmp.poll_interval_seconds"),
        ("qmp: {command_timeout_seconds: fast}", "qmp.command_timeout_seconds"),
        ("qmp: {labels: {'/a': {'bad-name': x}}}", "qmp.labels./a.bad-name"),
        ("qmp: {labels: {'/a': {vm: x}}}", "qmp.labels./a.vm"),
        ("qmp: {backoff_initial_seconds: 5, backoff_max_seconds: 1}", "qmp.backoff_max_seconds"),
        ("policy: {required: [werror, flush]}", "policy.required[1]"),
        ("policy: {max_timeout_seconds: -1}", "policy.max_timeout_seconds"),
        ("policy: {require_nonzero_timeout: 'yes please'}", "policy.require_nonzero_timeout"),
        ("hang: {state_file: ''}", "hang.state_file"),
        ("hang: {journal_file: ''}", "hang.journal_file"),
        ("hang: {journal_file: [a]}", "hang.journal_file"),
        ("hang: {journal_max_bytes: 1000}", "hang.journal_max_bytes"),
        ("hang: {journal_max_bytes: 16MiB}", "hang.journal_max_bytes"),
        ("hang: {journal_max_bytes: 1.5e7}", "hang.journal_max_bytes"),
        ("hang: {journal_max_bytes: true}", "hang.journal_max_bytes"),
        ("hang: {journal: /var/lib/x/hangs.jsonl}", "hang.journal"),
        ("web: {listen_address: [}", "line 1"),
        ("alerting: {runbook_base_url: ''}", "alerting.runbook_base_url"),
        ("alerting: {runbook_base_url: 42}", "alerting.runbook_base_url"),
        ("alerting: {runbook_base_url: 'https://wiki/runbooks#qemu'}", "alerting.runbook_base_url"),
        ("alerting: {runbook_base_url: 'ftp://wiki/runbooks.md'}", "alerting.runbook_base_url"),
        ("alerting: {runbook_base_url: 'https:///runbooks.md'}", "alerting.runbook_base_url"),
        ("alerting: {runbook_base_url: '//wiki/runbooks.md'}", "alerting.runbook_base_url"),
        ("alerting: {runbook_base_url: 'docs/run books.md'}", "alerting.runbook_base_url"),
        ("collectors: {blockstat: true}", "collectors.blockstat"),
        ("libvirt: {uri: 'qemu:///system'}\nqmp: {labels: {'qemu:///*': {dc: a}}}", "qmp.labels.qemu:///*"),
        ("libvirt: {labels: {'qemu:///system': {vm: x}}}", "libvirt.labels.qemu:///system.vm"),
        ("libvirt: {backoff_initial_seconds: 5, backoff_max_seconds: 1}", "libvirt.backoff_max_seconds"),
        ("collectors: {blockstats: yes please}", "collectors.blockstats"),
        ("collectors: {disable_defaults: 1}", "collectors.disable_defaults"),
        ("collectors: [blockstats]", "collectors"),
    ],
)
def test_bad_config_names_file_and_key(tmp_path: Path, doc: str, key: str) -> None:
    p = tmp_path / "bad.yml"
    p.write_text(doc)
    with pytest.raises(ConfigError) as exc:
        load_file(str(p))
    assert exc.value.origin == str(p)
    assert exc.value.key == key
    assert str(exc.value).startswith(f"{p}: {key}: ")


def test_alerting_runbook_base_url() -> None:
    """Default: the rules' default (docs/runbooks.md); an http(s) address or a path is taken."""
    am = {"alertmanager_urls": ["http://am:9093"], "instance": "hv1:9738"}
    assert parse({"alerting": am}, "x").alerting.runbook_base_url == "docs/runbooks.md"
    for base in ("https://git.internal/ops/x/blob/main/docs/runbooks.md", "/srv/docs/runbooks.md"):
        cfg = parse({"alerting": {**am, "runbook_base_url": base}}, "x")
        assert cfg.alerting.runbook_base_url == base


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exporter", *args], cwd=REPO, capture_output=True, text=True, timeout=30
    )


def test_cli_bad_config_file_one_line_exit_2(tmp_path: Path) -> None:
    p = tmp_path / "bad.yml"
    p.write_text("policy: {required: [werror, nope]}\n")
    r = run_cli(f"--config.file={p}")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1, r.stderr
    assert str(p) in r.stderr and "policy.required[1]" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_bad_runbook_base_url_one_line_exit_2(tmp_path: Path) -> None:
    p = tmp_path / "bad.yml"
    p.write_text(
        "alerting:\n  alertmanager_urls: ['http://127.0.0.1:9']\n  instance: 'hv1:9738'\n"
        "  runbook_base_url: 'https://wiki.internal/runbooks.md#top'\n"
    )
    r = run_cli(f"--config.file={p}")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1, r.stderr
    assert f"{p}: alerting.runbook_base_url: " in r.stderr and "Traceback" not in r.stderr


def test_cli_missing_config_file(tmp_path: Path) -> None:
    r = run_cli(f"--config.file={tmp_path}/nope.yml")
    assert r.returncode == 2
    assert r.stderr.strip() == f"qemu-iohang-exporter: {tmp_path}/nope.yml: (file): No such file or directory"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--log.level=loud"], "--log.level"),
        (["--web.listen-address=nowhere"], "--web.listen-address"),
        (["--web.telemetry-path=metrics"], "--web.telemetry-path"),
        (["--no-such-flag"], "--no-such-flag"),
        (
            ["--collector.blockstat"],
            "--collector.blockstat: 'blockstat' is not a collector (one of vm, policy",
        ),
        (["--no-collector.hangs"], "--no-collector.hangs: 'hangs' is not a collector"),
    ],
)
def test_cli_bad_flag_one_line_exit_2(args: list[str], needle: str) -> None:
    r = run_cli(*args)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1, r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr


def test_cli_version() -> None:
    from exporter import __version__

    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"qemu-iohang-exporter {__version__}"


@pytest.mark.parametrize(
    ("doc", "argv", "enabled"),
    [
        ("", [], DEFAULT_COLLECTORS),
        ("", ["--collector.blockstats"], DEFAULT_COLLECTORS | {"blockstats"}),
        (
            "",
            ["--no-collector.process", "--no-collector.libvirt"],
            DEFAULT_COLLECTORS - {"process", "libvirt"},
        ),
        ("", ["--collector.disable-defaults", "--collector.hang"], {"hang"}),
        ("collectors: {blockstats: true, vm: false}", [], DEFAULT_COLLECTORS - {"vm"} | {"blockstats"}),
        # Flags win over the file, whichever way.
        ("collectors: {blockstats: true}", ["--no-collector.blockstats"], DEFAULT_COLLECTORS),
        ("collectors: {disable_defaults: true, session: true}", ["--collector.vm"], {"session", "vm"}),
        ("collectors: {hang: false}", ["--collector.hang"], DEFAULT_COLLECTORS),
    ],
)
def test_collectors_from_file_and_flags(tmp_path: Path, doc: str, argv: list[str], enabled: set[str]) -> None:
    from exporter.cli import parse_args, resolve

    p = tmp_path / "c.yml"
    p.write_text(doc)
    assert resolve(parse_args([f"--config.file={p}", *argv])).collectors.enabled == enabled


def test_journal_defaults_off_with_a_16_mib_cap() -> None:
    hc = parse(None, "x").hang
    assert (hc.journal_file, hc.journal_max_bytes) == (None, 16 * 1024 * 1024)


def test_cli_journal_in_a_missing_directory_one_line_exit_2(tmp_path: Path) -> None:
    """A journal that cannot be created is refused at start, naming the flag or the file and key."""
    target = tmp_path / "nope" / "hangs.jsonl"
    r = run_cli(f"--hang.journal-file={target}", "--web.listen-address=127.0.0.1:0")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert (
        r.stderr.strip() == f"qemu-iohang-exporter: --hang.journal-file: {target}: No such file or directory"
    )
    p = tmp_path / "c.yml"
    p.write_text(f"hang: {{journal_file: {target}}}\nweb: {{listen_address: '127.0.0.1:0'}}\n")
    r = run_cli(f"--config.file={p}")
    assert r.returncode == 2
    assert (
        r.stderr.strip()
        == f"qemu-iohang-exporter: {p}: hang.journal_file: {target}: No such file or directory"
    )


def test_libvirt_settings_of_their_own(tmp_path: Path) -> None:
    """libvirt's poll interval, backoff and labels live in ``libvirt:``; a file that set them
    under ``qmp:`` for both keeps its meaning, and labels keyed by a libvirt URI under ``qmp:``
    fail with one line saying what to rename (issue 24)."""
    both = parse(
        {"qmp": {"poll_interval_seconds": 2, "backoff_max_seconds": 3}, "libvirt": {"uri": "qemu:///system"}},
        "x",
    )
    assert (both.libvirt.poll_interval_seconds, both.libvirt.backoff_max_seconds) == (2.0, 3.0)
    own = parse(
        {
            "qmp": {"poll_interval_seconds": 2},
            "libvirt": {
                "uri": "qemu:///system",
                "poll_interval_seconds": 7,
                "labels": {"qemu:///system": {"dc": "a"}},
            },
        },
        "x",
    )
    assert (own.qmp.poll_interval_seconds, own.libvirt.poll_interval_seconds) == (2.0, 7.0)
    assert own.libvirt.labels == {"qemu:///system": {"dc": "a"}}
    assert parse({}, "x").libvirt.poll_interval_seconds == 5.0
    with pytest.raises(ConfigError) as exc:
        parse(
            {"libvirt": {"uri": "qemu:///system"}, "qmp": {"labels": {"qemu:///system": {"dc": "a"}}}},
            "c.yml",
        )
    assert str(exc.value) == (
        "c.yml: qmp.labels.qemu:///system: labels of libvirt domains moved: rename to libvirt.labels.qemu:///system"
    )


def test_static_labels_match_globs_and_exact_entries_alike_for_sockets_and_uris() -> None:
    """``qmp.labels`` by socket and ``libvirt.labels`` by URI match the same way (a glob
    pattern, then the exact entry, which wins), so renaming a ``qmp.labels`` pattern of a
    libvirt URI to ``libvirt.labels``, as the error says, keeps the labels."""
    from exporter.config import static_labels

    cfg = parse(
        {
            "qmp": {"labels": {"/run/vms/*.qmp": {"dc": "a", "rack": "1"}, "/run/vms/db.qmp": {"rack": "2"}}},
            "libvirt": {"uri": "qemu:///system", "labels": {"qemu:///*": {"dc": "b"}}},
        },
        "x",
    )
    assert static_labels(cfg.qmp.labels, "/run/vms/db.qmp") == {"dc": "a", "rack": "2"}
    assert static_labels(cfg.qmp.labels, "/run/vms/web.qmp") == {"dc": "a", "rack": "1"}
    assert static_labels(cfg.qmp.labels, "/elsewhere/x.qmp") == {}
    assert static_labels(cfg.libvirt.labels, "qemu:///system") == {"dc": "b"}
