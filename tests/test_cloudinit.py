"""The cloudinit plugin: seed validation (unit) and real ISO / directory seeds."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from agent.pluginmanager import Hooks, make_plugin_manager
from agent.sdk import TaskError
from plugins.cloudinit import CloudInitPlugin, seed_files, validate_network_config
from tests.harness import require


def test_meta_data_names_the_instance() -> None:
    files = seed_files({"name": "web-1", "user_data": "#cloud-config\nhostname: web-1\n"})
    assert yaml.safe_load(files["meta-data"]) == {"instance-id": "web-1", "local-hostname": "web-1"}
    assert files["user-data"] == "#cloud-config\nhostname: web-1\n"
    assert "network-config" not in files


def test_explicit_instance_id_and_hostname_are_quoted_yaml() -> None:
    files = seed_files({"name": "a", "instance_id": "iid: tricky", "hostname": "h'x"})
    assert yaml.safe_load(files["meta-data"]) == {"instance-id": "iid: tricky", "local-hostname": "h'x"}


def test_bad_yaml_names_the_line() -> None:
    with pytest.raises(TaskError) as err:
        seed_files({"name": "a", "user_data": "#cloud-config\nruncmd:\n  - [echo, hi\npackages: []\n"})
    assert err.value.code == "invalid-seed"
    assert "user_data line 4" in str(err.value) and "invalid YAML" in str(err.value)


def test_unknown_key_names_the_line_and_suggests() -> None:
    with pytest.raises(TaskError) as err:
        seed_files({"name": "a", "user_data": "#cloud-config\nhostname: a\nruncmdd:\n  - echo hi\n"})
    message = str(err.value)
    assert message.startswith("user_data line 3: unknown cloud-config key 'runcmdd'")
    assert "did you mean 'runcmd'?" in message


# What cloud-init's own schema refuses, as the issue lists it and a few more: each message
# names the line, the path of the value and the reason, the same on every jsonschema release.
@pytest.mark.parametrize(
    ("user_data", "message"),
    [
        ("runcmd: ls -l\n", "user_data line 2: runcmd: must be a list, not a string ('ls -l')"),
        ("users:\n  - name: alice\n    ssh_authorized_keys: ssh-ed25519 AAAA\n",
         "user_data line 4: users[0].ssh_authorized_keys: must be a list, not a string ('ssh-ed25519 AAAA')"),
        ("users:\n  - default\n  - name: alice\n    lock_passwd: 'no'\n",
         "user_data line 5: users[1].lock_passwd: must be a boolean, not a string ('no')"),
        ("users:\n  - 5\n", "user_data line 3: users[0]: must be a string or a list or a mapping, not an integer (5)"),
        ("users:\n  - name: a\n    ssh_authorised_keys: [k]\n",
         "user_data line 4: users[0].ssh_authorised_keys: unknown key (did you mean 'ssh_authorized_keys'?)"),
        ("write_files:\n  - content: hello\n", "user_data line 3: write_files[0]: missing the required key 'path'"),
        ("packages:\n  vim: latest\n",
         "user_data line 2: packages: must be a list, not a mapping ({'vim': 'latest'})"),
        ("power_state:\n  mode: sleep\n",
         "user_data line 3: power_state.mode: 'sleep' is not one of 'poweroff', 'reboot', 'halt'"),
        ("ntp:\n  enabeld: true\n", "user_data line 3: ntp.enabeld: unknown key (did you mean 'enabled'?)"),
        ("hostname: a\nruncmd: x\npackages: y\n",
         "user_data line 3: runcmd: must be a list, not a string ('x') (and 1 more)"),
    ],
)
def test_cloud_config_is_checked_against_cloud_inits_schema(user_data: str, message: str) -> None:
    with pytest.raises(TaskError) as err:
        seed_files({"name": "a", "user_data": "#cloud-config\n" + user_data})
    assert err.value.code == "invalid-seed"
    assert str(err.value) == message
    assert seed_files({"name": "a", "user_data": "#!/bin/sh\n" + user_data})  # a script is not cloud-config


def test_vendor_data_is_checked_like_user_data() -> None:
    with pytest.raises(TaskError) as err:
        seed_files({"name": "a", "vendor_data": "#cloud-config\nbootcmd: reboot\n"})
    assert str(err.value) == "vendor_data line 2: bootcmd: must be a list, not a string ('reboot')"


def test_a_full_seed_passes_the_schema() -> None:
    user_data = """#cloud-config
hostname: web-1
users:
  - default
  - name: alice
    shell: /bin/bash
    lock_passwd: true
    ssh_authorized_keys: [ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE alice@example]
runcmd:
  - [sh, -c, echo hi]
  - echo there
write_files:
  - path: /etc/motd
    content: !!binary aGVsbG8K
packages: [nginx, [libc6, "2.36"]]
datasource_list: [NoCloud, None]
"""
    assert seed_files({"name": "a", "user_data": user_data})["user-data"] == user_data


def test_cloud_config_must_be_a_mapping() -> None:
    with pytest.raises(TaskError, match="must be a mapping"):
        seed_files({"name": "a", "user_data": "#cloud-config\n- runcmd\n"})


@pytest.mark.parametrize(
    "user_data",
    [
        "#!/bin/sh\necho {not yaml\n",
        "#cloud-boothook\n#!/bin/sh\necho hi\n",
        'Content-Type: multipart/mixed; boundary="b"\nMIME-Version: 1.0\n\n--b--\n',
        "",
        "#cloud-config\n",
    ],
)
def test_scripts_multipart_and_empty_pass(user_data: str) -> None:
    assert seed_files({"name": "a", "user_data": user_data})["user-data"] == user_data


def test_unknown_format_is_refused() -> None:
    with pytest.raises(TaskError, match="user_data line 1: unknown format"):
        seed_files({"name": "a", "user_data": "hostname: a\n"})


def test_network_config_v2_mapping_is_written_as_yaml() -> None:
    config = {"version": 2, "ethernets": {"eth0": {"dhcp4": True}}}
    assert yaml.safe_load(validate_network_config(config)) == config
    assert yaml.safe_load(validate_network_config({"network": config})) == {"network": config}


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"version": 3}, "version must be 1 or 2"),
        ({"version": 2, "ethernet": {}}, "unknown key 'ethernet'"),
        ("version: 2\nethernets: [\n", "network_config line 3"),
        (["eth0"], "must be a mapping"),
    ],
)
def test_bad_network_config(config: object, message: str) -> None:
    with pytest.raises(TaskError, match=message):
        validate_network_config(config)


async def test_directory_seed_for_lxc(tmp_path: Path) -> None:
    hooks = Hooks(make_plugin_manager({"cloudinit": CloudInitPlugin()}))
    seed = await hooks.instance_seed(
        instance={"name": "c1", "user_data": "#!/bin/sh\necho hi\n", "vendor_data": "#cloud-config\n"},
        medium="directory",
        workdir=tmp_path,
    )
    assert seed == tmp_path / "nocloud"
    assert sorted(p.name for p in seed.iterdir()) == ["meta-data", "user-data", "vendor-data"]
    assert (seed / "user-data").read_text() == "#!/bin/sh\necho hi\n"


async def test_invalid_seed_writes_nothing(tmp_path: Path) -> None:
    hooks = Hooks(make_plugin_manager({"cloudinit": CloudInitPlugin()}))
    with pytest.raises(TaskError):
        await hooks.instance_seed(
            instance={"name": "a", "user_data": "#cloud-config\nbogus: 1\n"}, medium="iso", workdir=tmp_path
        )
    assert list(tmp_path.iterdir()) == []


async def test_a_node_without_an_iso_tool_cannot_build_the_seed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(TaskError, match="install genisoimage") as err:
        await CloudInitPlugin().kumo_instance_seed(instance={"name": "a"}, medium="iso", workdir=tmp_path)
    assert err.value.code == "seed-build"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.integration
async def test_iso_seed_is_a_cidata_volume(tmp_path: Path) -> None:
    require(shutil.which("genisoimage") is not None, "genisoimage (scripts/deps/10-libvirt.sh)")
    require(shutil.which("isoinfo") is not None, "isoinfo (genisoimage)")
    hooks = Hooks(make_plugin_manager({"cloudinit": CloudInitPlugin()}))
    user_data = "#cloud-config\nruncmd:\n  - echo hello\n"
    network = {"version": 2, "ethernets": {"eth0": {"dhcp4": True}}}
    iso = await hooks.instance_seed(
        instance={"name": "vm-1", "user_data": user_data, "network_config": network},
        medium="iso",
        workdir=tmp_path,
    )
    assert iso == tmp_path / "cidata.iso"
    assert [p.name for p in tmp_path.iterdir()] == ["cidata.iso"]  # staging removed
    assert iso.stat().st_mode & 0o777 == 0o600, "user-data may hold secrets: root's alone"
    info = subprocess.run(  # noqa: S603 - an argv list, never a shell
        ["isoinfo", "-d", "-i", str(iso)], capture_output=True, text=True, check=True
    )
    assert "Volume id: cidata" in info.stdout

    def extract(name: str) -> str:
        return subprocess.run(  # noqa: S603 - an argv list, never a shell
            ["isoinfo", "-R", "-i", str(iso), "-x", f"/{name}"], capture_output=True, text=True, check=True
        ).stdout

    assert extract("user-data") == user_data
    assert yaml.safe_load(extract("meta-data"))["instance-id"] == "vm-1"
    assert yaml.safe_load(extract("network-config")) == network
