"""The console: which worker lines reach it, the log file, and the progress display."""

import io
import logging
import warnings

from mallows_ray import console


def test_only_stage_lines_and_errors_reach_the_console():
    for line in ("[train] step 4/40 | ETA 1:02 | loss 1.3", "Traceback (most recent call last):", "RuntimeError: boom"):
        assert console.kept_lines([line]) == [line]
    assert console.kept_lines(["Reporting training result 2: TrainingReport(metrics={...}) from rank 1"]) == []
    assert console.kept_lines(["Loading weights: 100%|##########| 272/272"]) == []
    # a batch with an error in it is kept whole: the lines around a traceback explain it
    batch = ["Loading weights: 100%", "Traceback (most recent call last):", "  File x.py, line 1"]
    assert console.kept_lines(batch) == batch
    assert console.kept_lines(["Loading weights: 100%", "[prepare] reading"]) == ["[prepare] reading"]


def _restore_logging(saved):
    root, warnings_logger = logging.getLogger(), logging.getLogger("py.warnings")
    root.handlers[:], warnings_logger.handlers[:] = saved["root"], saved["warnings"]
    warnings_logger.propagate = True
    logging.captureWarnings(False)


def test_filtered_worker_output_keeps_error_batches_whole(tmp_path):
    saved = {"root": list(logging.getLogger().handlers), "warnings": list(logging.getLogger("py.warnings").handlers)}
    try:
        _check_filtered_output(tmp_path)
    finally:
        _restore_logging(saved)


def _check_filtered_output(tmp_path):
    console.configure(tmp_path / "console.log", verbose=False)
    printed = []
    handler = console._filtered(lambda data: printed.append(data["lines"]))
    handler({"pid": 7, "lines": ["Reporting training result 1: ...", "[train] step 2/4 | loss 1.0"]})
    handler({"pid": 7, "lines": ["Traceback (most recent call last):", '  File "loop.py", line 3', "ValueError: x"]})
    # Ray's own processes name themselves where a worker has a pid: their shutdown errors go to the file only
    handler({"pid": "gcs_server", "lines": ["gcs_actor_scheduler.cc:538: Failed to kill actor 1f: RpcError"]})
    assert printed == [["[train] step 2/4 | loss 1.0"],
                       ["Traceback (most recent call last):", '  File "loop.py", line 3', "ValueError: x"]]
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.warn("old API", DeprecationWarning)
    for handler in logging.getLogger().handlers:
        handler.flush()
    text = (tmp_path / "console.log").read_text()
    assert "Reporting training result 1" in text and "old API" in text  # the log file has everything
    assert "Failed to kill actor 1f" in text


def test_ray_driver_logs_go_to_the_file_and_errors_stay_on_the_console(tmp_path):
    """quiet_ray_logs (before ray.init): Ray's own stderr handler keeps errors only; the file gets the rest."""
    import ray.data  # noqa: F401  (its import installs the "ray.data" logger's handlers)

    ray_logger, data_logger = logging.getLogger("ray"), logging.getLogger("ray.data")
    saved = {"root": list(logging.getLogger().handlers), "warnings": list(logging.getLogger("py.warnings").handlers),
             "ray": list(ray_logger.handlers), "data": list(data_logger.handlers),
             "levels": [h.level for h in (*ray_logger.handlers, *data_logger.handlers)]}
    stderr = io.StringIO()
    ray_logger.addHandler(logging.StreamHandler(stderr))  # stands for the handler Ray installs on import
    try:
        console.configure(tmp_path / "console.log", verbose=False)
        console.quiet_ray_logs()
        ray_logger.warning("Token authentication is enabled for this Ray cluster")
        ray_logger.error("Actor died unexpectedly")
        for handler in ray_logger.handlers:
            handler.flush()
        assert stderr.getvalue() == "Actor died unexpectedly\n"
        # Ray Data's logger (its own stderr handler, set up when ray.data is imported) is quieted the same way
        data_logger = logging.getLogger("ray.data")
        data_logger.info("Execution plan of Dataset dataset_1")
        assert all(h.level >= logging.ERROR for h in data_logger.handlers
                   if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler))
        for handler in (*ray_logger.handlers, *data_logger.handlers):
            handler.flush()
        text = (tmp_path / "console.log").read_text()
        assert "Token authentication is enabled" in text and "Actor died unexpectedly" in text
        assert "Execution plan of Dataset dataset_1" in text
    finally:
        ray_logger.handlers[:], data_logger.handlers[:] = saved["ray"], saved["data"]
        for handler, level in zip((*saved["ray"], *saved["data"]), saved["levels"]):
            handler.setLevel(level)
        _restore_logging(saved)


def test_progress_lines_count_rate_and_eta():
    stream = io.StringIO()  # not a terminal: one line per update, no bar
    progress = console.Progress("generate", 10, "replies", stream=stream)
    progress.update(4)
    progress.update(6)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("[generate] 4/10 replies | ") and "ETA" in lines[0]
    assert "[" not in lines[1].split("]", 1)[1]  # no bar off a terminal
    assert lines[1].startswith("[generate] 10/10 replies") and lines[1].endswith("ETA 0:00")
