"""Run by test_ops under a Python that has Airflow (env NDOP_AIRFLOW_PYTHON): imports the example DAG, then
calls its task with a stand-in ``ndop`` (NDOP_BIN) exiting 0, 3 and 1, and prints what Airflow would do."""
from __future__ import annotations

import importlib.util
import json
import os
import sys


def main(path: str) -> None:
    spec = importlib.util.spec_from_file_location("ndop_dag", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    dag = module.dag
    outcomes = {}
    for code in ("0", "3", "1"):
        os.environ["FAKE_EXIT"] = code
        try:
            module.ndop_run()
            outcomes[code] = "ok"
        except module.AirflowFailException:
            outcomes[code] = "fail"
        except module.AirflowException:
            outcomes[code] = "retry"
    print(json.dumps({"dag_id": dag.dag_id, "tasks": [t.task_id for t in dag.tasks], "outcomes": outcomes,
                      "retries": dag.default_args["retries"]}))


if __name__ == "__main__":
    main(sys.argv[1])
