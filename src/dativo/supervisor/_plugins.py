"""Launching one plugin: in a hardened container, or (trusted mode) in a supervisor thread."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from dativo import __version__
from dativo.config import BuiltinPlugin, ImagePlugin, JobConfig, PluginSpec, PythonPlugin
from dativo.connectors import builtin_implementation
from dativo.errors import ConfigError
from dativo.lake._env import Redactor, expand_env
from dativo.sandbox import (
    LABEL_ROLE,
    LABEL_RUN_DIR,
    LABEL_RUN_ID,
    SOCKET_NAME,
    Container,
    ContainerSpec,
    Engine,
    ExitInfo,
    ImageInfo,
    Mount,
)
from dativo.signing import Grants, VerifiedPlugin, verify_plugin
from dativo.supervisor._network import PluginNetwork, split_destination

log = logging.getLogger(__name__)

IMAGE_ENV = "DATIVO_PYTHON_IMAGE"
BUILTIN_IMAGE_ENV = "DATIVO_BUILTIN_IMAGE"
INPUT_MOUNT = "/data/in"
OUTPUT_MOUNT = "/data/out"
PLUGIN_MOUNT = "/plugin"
SOCKET_MOUNT = "/run/dativo"


def python_image() -> str:
    """The runtime image `type: python` plugins are mounted into."""
    return os.environ.get(IMAGE_ENV) or f"dativo/plugin-python:{__version__}"


def builtin_image(name: str) -> str:
    """The signed image of the built-in plugin `name` (`DATIVO_BUILTIN_IMAGE` is a template
    with `{name}` and `{version}`, for tests)."""
    template = os.environ.get(BUILTIN_IMAGE_ENV) or "dativo/builtin-{name}:{version}"
    return template.format(name=name, version=__version__)


@dataclass(frozen=True)
class Launch:
    """How to run one plugin, resolved from its spec."""

    role: str
    spec: PluginSpec
    field_path: str  # `source.reader` or `target.writer`, for messages
    image: str | None
    implementation: str | None
    python_path: Path | None
    input_dir: Path | None = None
    output_dir: Path | None = None
    command: tuple[str, ...] = ()  # the container's command (after the image's entrypoint)
    # The plugin's `config` with every `${NAME}` reference expanded from the supervisor's
    # environment. It travels only in the `init` message over the plugin's socket: never in the
    # container's environment, labels, command line or logs.
    config: Mapping[str, Any] = field(default_factory=dict)
    # Remembers the values those references expanded to, masked in everything the plugin says.
    redactor: Redactor = field(default_factory=Redactor)

    @property
    def name(self) -> str:
        return self.spec.display_name

    def redact(self, text: str) -> str:
        """`text` with every expanded secret value replaced by `***`."""
        return self.redactor(text)


def resolve(job: JobConfig, role: str, staging: Path | None) -> Launch:
    """Turn a plugin spec into what to launch."""
    if role == "reader":
        spec: PluginSpec = job.source.reader
        field_path = "source.reader"
        input_dir, output_dir = job.source_files_dir, None
    else:
        spec = job.target.writer
        field_path = "target.writer"
        input_dir, output_dir = None, staging
    if input_dir is not None and not input_dir.is_dir():
        raise ConfigError(
            f"`source.files`: directory `{input_dir}` does not exist", field="source.files"
        )
    impl: str | None
    if isinstance(spec, BuiltinPlugin):
        # The built-in's own image names its class in its (signed) entrypoint.
        image, impl, path = builtin_image(spec.name), builtin_implementation(spec.name), None
    elif isinstance(spec, PythonPlugin):
        image, impl, path = python_image(), spec.implementation, job.python_plugin_dir(spec)
        if path is not None and not path.is_dir():
            raise ConfigError(
                f"`{field_path}.path`: directory `{path}` does not exist", field=field_path
            )
    elif isinstance(spec, ImagePlugin):
        image, impl, path = spec.image, spec.implementation, None
    else:  # pragma: no cover - the config union is closed
        raise ConfigError(f"unknown plugin type for `{field_path}`")
    redactor = Redactor()
    config = expand_config(spec.config, f"{field_path}.config", redactor)
    return Launch(
        role=role,
        spec=spec,
        field_path=field_path,
        image=image,
        implementation=impl,
        python_path=path,
        input_dir=input_dir,
        output_dir=output_dir,
        command=() if isinstance(spec, BuiltinPlugin) or impl is None else (impl,),
        config=config,
        redactor=redactor,
    )


def expand_config(
    value: Any, field_path: str, redactor: Redactor, environ: Mapping[str, str] | None = None
) -> Any:
    """`value` (a plugin's config) with `${NAME}` in every string replaced from the environment
    (`expand_env`); `redactor` remembers each expanded value, to mask it in what the plugin
    logs or reports.

    Raises:
        ConfigError: a referenced variable is not set; the message names the variable and the
            config key, never a value.
    """
    if isinstance(value, str):
        return expand_env(value, field=field_path, environ=environ, redactor=redactor)
    if isinstance(value, Mapping):
        return {
            k: expand_config(v, f"{field_path}.{k}", redactor, environ) for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [
            expand_config(v, f"{field_path}[{i}]", redactor, environ) for i, v in enumerate(value)
        ]
    return value


def verify_launch(launch: Launch, image: ImageInfo) -> tuple[Launch, VerifiedPlugin]:
    """Verify the plugin's image (signature, trust policy, manifest, grants); fail closed.

    Returns the launch to run (resources completed from the manifest's defaults, no command
    that would change a signed entrypoint) and the verification.

    Raises:
        SignatureError: the image may not run.
        ConfigError: the trust store or policy is malformed, or the job grants more than the
            signed manifest declares.
    """
    spec = launch.spec
    resources = spec.resources
    grants = Grants(
        network=tuple(spec.network),
        resources={
            name: getattr(resources, name) for name in ("cpus", "memory", "pids", "timeout")
        },
        explicit=frozenset(resources.model_fields_set),
        field_path=launch.field_path,
    )
    verified = verify_plugin(
        image,
        role=launch.role,  # type: ignore[arg-type]
        grants=grants,
        reference=launch.image,
        plugin=launch.name,
        expected_name=f"dativo/{spec.name}" if isinstance(spec, BuiltinPlugin) else None,
        local_code=isinstance(spec, PythonPlugin),
    )
    command = launch.command
    if verified.signed and command:
        assert verified.manifest is not None
        if verified.manifest.entrypoint[-len(command) :] != command:
            raise ConfigError(
                f"`{launch.field_path}.implementation`: the signed manifest of "
                f"`{verified.manifest.name}` fixes what the image runs "
                f"(`{list(verified.manifest.entrypoint)}`); remove `implementation`",
                field=f"{launch.field_path}.implementation",
            )
        command = ()  # the signed entrypoint names it already
    updated = {k: v for k, v in verified.resources.items() if getattr(resources, k) != v}
    if updated:
        spec = spec.model_copy(update={"resources": resources.model_copy(update=updated)})
    return dataclasses.replace(launch, spec=spec, command=command), verified


class PluginProcess(Protocol):
    """A running plugin, whatever runs it."""

    launch: Launch

    def exit_info(self) -> ExitInfo | None: ...

    def wait(self, timeout: float) -> ExitInfo | None: ...

    def logs(self) -> str: ...

    def stop(self) -> None: ...

    def describe(self) -> dict[str, Any]: ...


@dataclass
class ContainerPlugin:
    """A plugin in its own hardened container."""

    launch: Launch
    container: Container
    image_id: str
    final: ExitInfo | None = None
    killed: bool = False

    def exit_info(self) -> ExitInfo | None:
        if self.final is not None:
            return self.final
        return self.container.exit_info()

    def wait(self, timeout: float) -> ExitInfo | None:
        return self.container.wait(timeout)

    def logs(self) -> str:
        return self.container.logs()

    def stop(self) -> None:
        """Kill (if still running) and remove the container, keeping how it ended."""
        if self.final is not None:
            return
        info = self.container.exit_info()
        if info is None:
            self.killed = True
            self.container.kill()
            info = self.container.wait(5.0)
        self.final = info or ExitInfo(status=-1, oom_killed=False, error="not stopped")
        self.container.remove()

    def describe(self) -> dict[str, Any]:
        info = self.exit_info()
        return {
            "plugin": self.launch.name,
            "mode": "container",
            "image": self.image_id,
            "container": self.container.name,
            "exit_code": None if info is None else info.status,
            "oom_killed": None if info is None else info.oom_killed,
            "killed_by_supervisor": self.killed,
        }


def start_container(
    engine: Engine,
    launch: Launch,
    *,
    image_id: str,
    run_id: str,
    run_dir: Path,
    socket_dir: Path,
    network: PluginNetwork | None = None,
) -> ContainerPlugin:
    """Start the plugin's container: only its socket directory and granted paths mounted.

    `network` (the plugin's granted destinations, forwarded as Unix sockets inside its socket
    directory) adds `DATIVO_NETWORK`/`DATIVO_NETWORK_TCP` and the granted host names'
    `/etc/hosts` lines; the container keeps `network_mode: none`.
    """
    resources = launch.spec.resources
    env = {"DATIVO_SOCKET": f"{SOCKET_MOUNT}/{SOCKET_NAME}", "DATIVO_ROLE": launch.role}
    if network is not None:
        env.update(network.environment())
    mounts = [Mount(socket_dir, SOCKET_MOUNT, read_only=True)]
    if launch.input_dir is not None:
        mounts.append(Mount(launch.input_dir, INPUT_MOUNT, read_only=True))
        env["DATIVO_INPUT_DIR"] = INPUT_MOUNT
    if launch.output_dir is not None:
        mounts.append(Mount(launch.output_dir, OUTPUT_MOUNT, read_only=False))
        env["DATIVO_OUTPUT_DIR"] = OUTPUT_MOUNT
    if launch.python_path is not None:
        mounts.append(Mount(launch.python_path, PLUGIN_MOUNT, read_only=True))
        env["DATIVO_PLUGIN_PATH"] = PLUGIN_MOUNT
    spec = ContainerSpec(
        name=f"dativo-{run_id}-{launch.role}",
        image=image_id,
        command=launch.command,
        environment=env,
        mounts=tuple(mounts),
        labels={LABEL_RUN_ID: run_id, LABEL_RUN_DIR: str(run_dir), LABEL_ROLE: launch.role},
        cpus=resources.cpus,
        memory=resources.memory,
        pids=resources.pids,
        tmpfs=resources.tmpfs,
        user=launch.spec.isolation.user,
        runtime=launch.spec.isolation.runtime,
        extra_hosts={} if network is None else network.extra_hosts(),
    )
    container = engine.start(spec)
    return ContainerPlugin(launch=launch, container=container, image_id=image_id)


@dataclass
class ThreadPlugin:
    """UNSANDBOXED: the plugin runs in a thread of the supervisor, with its privileges."""

    launch: Launch
    thread: threading.Thread
    sock: socket.socket
    status: list[int] = field(default_factory=list)

    def exit_info(self) -> ExitInfo | None:
        if self.thread.is_alive():
            return None
        return ExitInfo(status=self.status[0] if self.status else 1, oom_killed=False)

    def wait(self, timeout: float) -> ExitInfo | None:
        self.thread.join(timeout)
        return self.exit_info()

    def logs(self) -> str:
        return ""

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(5)

    def describe(self) -> dict[str, Any]:
        info = self.exit_info()
        return {
            "plugin": self.launch.name,
            "mode": "in-process (unsandboxed)",
            "exit_code": None if info is None else info.status,
        }


def start_thread(launch: Launch, socket_path: Path) -> ThreadPlugin:
    """Run the plugin host in a thread connected to the run's socket (trusted mode)."""
    from dativo.host import load_plugin_class, serve
    from dativo.protocol.v1 import Channel
    from dativo.sdk import NetworkDestination

    if launch.implementation is None:
        raise ConfigError(
            f"`{launch.field_path}` is an image without `implementation`; the in-process mode "
            "can only run Python plugin classes"
        )
    if launch.python_path is not None and str(launch.python_path) not in sys.path:
        sys.path.insert(0, str(launch.python_path))
    cls = load_plugin_class(launch.implementation)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(socket_path))
    status: list[int] = []
    # UNSANDBOXED: the plugin has the supervisor's own network; grants are not enforced, the
    # plugin is only told the destinations, to connect to directly.
    network = {}
    for destination in launch.spec.network:
        host, port = split_destination(destination)
        network[destination] = NetworkDestination(destination=destination, host=host, port=port)

    def body() -> None:
        channel = Channel(sock, max_frame_bytes=1 << 31, poll=1.0)
        try:
            status.append(
                serve(
                    channel,
                    cls,
                    input_dir=launch.input_dir,
                    output_dir=launch.output_dir,
                    logger=logging.getLogger(f"dativo.plugin.{cls.name}"),
                    network=network,
                )
            )
        except Exception:
            log.exception("in-process %s failed", launch.role)
            status.append(1)
        finally:
            channel.close()

    thread = threading.Thread(target=body, name=f"dativo-{launch.role}", daemon=True)
    thread.start()
    return ThreadPlugin(launch=launch, thread=thread, sock=sock, status=status)
