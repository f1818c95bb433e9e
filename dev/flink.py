"""A local Apache Flink session cluster (a JobManager and a TaskManager, two processes on loopback) and
the pieces Beam's FlinkRunner needs, all built by ``dev/build_flink.sh`` into ``.cache/flink`` (git-ignored):

- the Flink 1.19.3 distribution's jars from the ``apache-flink-libraries`` PyPI sdist (lib/, and
  bash-java-utils.jar, which works out the TaskManager's memory settings as Flink's start scripts do);
- Beam's Flink job server for Flink 1.19 at Beam 2.62.0, made from Maven Central's
  ``beam-runners-flink-1.19`` + ``beam-runners-java-job-service`` classpath (Central serves no
  ``beam-runners-flink-*-job-server`` jar at any Beam version tried) as a jar whose manifest names
  the main class and that classpath, so ``--flink_job_server_jar`` works and Beam downloads nothing;
- ``.venv-flink``: Python apache-beam 2.62.0 (the Python SDK must match the job server's Beam version;
  the project's own venv has Beam 2.77, whose Java artifacts Central does not serve).

    with FlinkCluster(tmp_dir) as cluster:
        argv = [*flink_args(cluster), "--manifest=...", ...]   # run by .venv-flink's python

Both processes run in their own process group, log under the cluster's folder and are stopped
(TaskManager first) on leaving the ``with`` block, also when starting failed.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import requests

from dev.service import HOST, LocalService, free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
FLINK_VERSION = "1.19.3"
BEAM_VERSION = "2.62.0"  # the newest Beam whose Flink 1.19 runner and job service Central serves together
CACHE = REPO_ROOT / ".cache" / "flink"
FLINK_HOME = CACHE / f"apache-flink-libraries-{FLINK_VERSION}" / "deps"
JOB_SERVER_JAR = CACHE / f"beam-runners-flink-1.19-job-server-{BEAM_VERSION}.jar"
FLINK_PYTHON = REPO_ROOT / ".venv-flink" / "bin" / "python"
START_TIMEOUT = 120.0
PARALLELISM = 2

# Small enough for a 2-core CI machine, with the network memory a Beam job of a few stages needs
# (the default 10% of 1280m gave "Insufficient number of network buffers: required 512").
_CONFIG = {
    "jobmanager.memory.process.size": "768m",
    "taskmanager.memory.process.size": "1728m",
    "taskmanager.memory.network.min": "320m",
    "taskmanager.memory.network.max": "320m",
    "taskmanager.memory.managed.size": "128m",
    "taskmanager.numberOfTaskSlots": str(PARALLELISM),
    "parallelism.default": str(PARALLELISM),
    "blob.server.port": "0",
    "taskmanager.rpc.port": "0",
    "taskmanager.data.port": "0",
}
# 4 slots (parallelism up to 4): twice the network memory ("required 512, but only 491 available" with _CONFIG's).
FOUR_SLOTS = {"taskmanager.memory.process.size": "2368m", "taskmanager.memory.network.min": "640m",
              "taskmanager.memory.network.max": "640m"}
_LOG4J = """rootLogger.level = INFO
rootLogger.appenderRef.file.ref = MainAppender
appender.main.name = MainAppender
appender.main.type = File
appender.main.fileName = ${sys:log.file}
appender.main.layout.type = PatternLayout
appender.main.layout.pattern = %d{yyyy-MM-dd HH:mm:ss,SSS} %-5p %c - %m%n
"""


def missing() -> list[str]:
    """What ``dev/build_flink.sh`` has not built yet (empty when Flink runs can start)."""
    needed = [FLINK_HOME / "lib" / f"flink-dist-{FLINK_VERSION}.jar", JOB_SERVER_JAR, FLINK_PYTHON]
    return [str(path) for path in needed if not path.exists()]


def _classpath() -> str:
    return str(FLINK_HOME / "lib" / "*")


def _java_opts(conf_dir: Path, log_file: Path) -> list[str]:
    return [f"-Dlog.file={log_file}", f"-Dlog4j.configurationFile=file:{conf_dir / 'log4j.properties'}"]


def taskmanager_resources(conf_dir: Path) -> tuple[list[str], list[str]]:
    """(JVM options, ``-D key=value`` arguments) for the TaskManager, from Flink's own BashJavaUtils."""
    done = subprocess.run(
        ["java", "-cp", f"{FLINK_HOME / 'bin' / 'bash-java-utils.jar'}:{_classpath()}",
         "org.apache.flink.runtime.util.bash.BashJavaUtils", "GET_TM_RESOURCE_PARAMS", "--configDir", str(conf_dir)],
        capture_output=True, text=True, timeout=60, check=True,
    )
    prefix = "BASH_JAVA_UTILS_EXEC_RESULT:"
    results = [line[len(prefix):] for line in done.stdout.splitlines() if line.startswith(prefix)]
    if len(results) < 2:
        raise RuntimeError(f"BashJavaUtils gave no TaskManager settings: {done.stdout[-500:]}{done.stderr[-500:]}")
    return results[0].split(), results[1].split()


class _FlinkProcess(LocalService):
    def __init__(self, cluster: "FlinkCluster", name: str, main_class: str) -> None:
        super().__init__(cluster.folder / "log" / f"{name}.out", START_TIMEOUT)
        self.name, self.cluster, self.main_class = f"Flink {name}", cluster, main_class
        self.jvm: list[str] = []
        self.dynamic: list[str] = []

    def command(self) -> tuple[list[str], Path, dict[str, str]]:
        log_file = self.cluster.folder / "log" / f"{self.name.split()[-1]}.log"
        argv = ["java", *self.jvm, *_java_opts(self.cluster.conf_dir, log_file), "-cp", _classpath(),
                self.main_class, "--configDir", str(self.cluster.conf_dir), *self.dynamic]
        return argv, self.cluster.folder, dict(os.environ)

    def ready(self) -> bool:
        return self.cluster.ready_for(self)


class FlinkCluster:
    """A Flink session cluster on free loopback ports: ``master`` is its REST address (host:port)."""

    def __init__(self, folder: str | os.PathLike[str], slots: int = PARALLELISM,
                 config: dict[str, str] | None = None) -> None:
        """``config``: Flink settings over the defaults (e.g. more network memory for more slots)."""
        if missing():
            raise FileNotFoundError(
                f"Flink is not built ({', '.join(missing())}): run dev/setup_env.sh (without NDOP_WITH_FLINK=0)")
        self.folder = Path(folder).resolve()
        self.conf_dir = self.folder / "conf"
        self.slots = slots
        self.config = config or {}
        self.rest_port = free_port()
        self.master = f"{HOST}:{self.rest_port}"
        self.jobmanager = _FlinkProcess(self, "jobmanager",
                                        "org.apache.flink.runtime.entrypoint.StandaloneSessionClusterEntrypoint")
        self.jobmanager.jvm = ["-Xmx512m"]
        self.taskmanager = _FlinkProcess(self, "taskmanager", "org.apache.flink.runtime.taskexecutor.TaskManagerRunner")

    def write_config(self) -> None:
        self.conf_dir.mkdir(parents=True, exist_ok=True)
        config = {
            "jobmanager.rpc.address": HOST, "jobmanager.bind-host": HOST, "jobmanager.rpc.port": str(free_port()),
            "taskmanager.host": HOST, "taskmanager.bind-host": HOST,
            "rest.address": HOST, "rest.bind-address": HOST, "rest.port": str(self.rest_port),
            **_CONFIG, "taskmanager.numberOfTaskSlots": str(self.slots), **self.config,
        }
        # flat "key: value" lines are valid YAML, which Flink 1.19 reads from config.yaml
        (self.conf_dir / "config.yaml").write_text("".join(f"{k}: {v}\n" for k, v in config.items()))
        (self.conf_dir / "log4j.properties").write_text(_LOG4J)

    def overview(self) -> dict[str, Any]:
        return dict(requests.get(f"http://{self.master}/overview", timeout=2).json())

    def ready_for(self, process: _FlinkProcess) -> bool:
        overview = self.overview()
        if process is self.jobmanager:
            return True
        return bool(overview["taskmanagers"] >= 1 and overview["slots-total"] >= self.slots)

    def start(self) -> "FlinkCluster":
        self.write_config()
        try:
            self.jobmanager.start()
            self.taskmanager.jvm, self.taskmanager.dynamic = taskmanager_resources(self.conf_dir)
            self.taskmanager.start()
        except BaseException:
            self.stop()
            raise
        return self

    def jobs(self) -> list[dict[str, Any]]:
        return list(requests.get(f"http://{self.master}/jobs/overview", timeout=5).json()["jobs"])

    def stop(self) -> None:
        self.taskmanager.stop()
        self.jobmanager.stop()

    def __enter__(self) -> "FlinkCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def flink_args(cluster: FlinkCluster, parallelism: int = PARALLELISM, environment_type: str = "LOOPBACK") -> list[str]:
    """Pipeline arguments for Beam's FlinkRunner on ``cluster`` with the locally built job server."""
    return [
        "--runner=FlinkRunner", f"--flink_master={cluster.master}", f"--flink_job_server_jar={JOB_SERVER_JAR}",
        f"--parallelism={parallelism}", f"--environment_type={environment_type}",
    ]


if __name__ == "__main__":  # pragma: no cover - prints what is missing, for setup checks
    print(json.dumps({"missing": missing(), "flink": FLINK_VERSION, "beam": BEAM_VERSION}))
