"""The local development and operations stack of IRIS DRS (``make demo`` / ``serve`` / ``stop``).

Kept apart from the science package :mod:`iris_tasks` (the architecture's module table: the dev
stack may import everything, nothing imports it but the benchmarks and the tests):

* :mod:`iris_devstack.stack` - start, watch and stop SeaweedFS, the compute server and the
  Airflow components under a supervisor;
* :mod:`iris_devstack.demo` - the demo driver (a simulated night through the running stack);
* :mod:`iris_devstack.services` - SeaweedFS, the supervisor and process tracking;
* :mod:`iris_devstack.airflow_env` - the environment variables that point Airflow at this
  repository (used by the stack, ``iris-drs airflow-env`` and the DAG tests);
* :mod:`iris_devstack.cli` - the ``iris-devstack`` command, and the ``airflow-env`` command it
  contributes to ``iris-drs`` through the ``iris_drs.cli`` entry-point group.
"""

__all__: list[str] = []
