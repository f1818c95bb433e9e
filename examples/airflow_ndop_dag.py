"""Airflow DAG: one `ndop run` a day; exit 3 (still waiting for NDOP) is "retry later", not a failure.

`ndop run` is resumable: a retry carries the same request on (no second MESH message), so the task is
retried every hour while NDOP has not answered; exit 1 (failed) or 2 (bad input) fails at once, unretried.
Secrets come from the worker's environment (e.g. an Airflow connection or a secrets backend exporting
MESH_PASSWORD etc.), never from the command line.
"""
from __future__ import annotations

import os
import subprocess
from datetime import datetime, timedelta

try:  # Airflow 3
    from airflow.providers.standard.operators.python import PythonOperator
    from airflow.sdk import DAG
    from airflow.sdk.exceptions import AirflowException, AirflowFailException
except ImportError:  # Airflow 2
    from airflow import DAG
    from airflow.exceptions import AirflowException, AirflowFailException
    from airflow.operators.python import PythonOperator

NDOP = os.environ.get("NDOP_BIN", "/srv/ndop/.venv/bin/ndop")
EXIT_WAITING = 3


class StillWaitingForNdop(AirflowException):
    """Raised on exit 3: the task fails this try and Airflow retries it after ``retry_delay``."""


def ndop_run(**_: object) -> None:
    done = subprocess.run([NDOP, "run", "--cohort", "fhir", "--wait", "300"], check=False)
    if done.returncode == EXIT_WAITING:
        raise StillWaitingForNdop("still waiting for NDOP's reply; retrying later")
    if done.returncode != 0:
        raise AirflowFailException(f"ndop run failed with exit status {done.returncode}; see its report")


with DAG(
    dag_id="ndop_sync",
    description="Keep FHIR Consents in step with the National Data Opt-out",
    schedule="15 6 * * *",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 48, "retry_delay": timedelta(hours=1), "retry_exponential_backoff": False},
    tags=["ndop"],
) as dag:
    PythonOperator(task_id="ndop_run", python_callable=ndop_run)
