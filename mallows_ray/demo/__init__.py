"""The demo application: `mallows-ray demo` on the embedded model and the bundled data.

    run.py      the demo itself: prepare -> train -> evaluate -> judged generations -> report
    data.py     where the bundled resources live (resources/): the listwise demo splits, the demo config,
                the small pairwise file of the example configs
    judges.py   three programmatic judges (conciseness, format, positivity): the objectives of the demo data
    control.py  lambda control measured: judge scores per generation lambda with bootstrap intervals
    plots.py    the report's PNG plots
    report.py   the report folder: metrics.json, summary.md and the plots

An application on top of the library: of the rest of mallows_ray only the CLI imports it.
"""
