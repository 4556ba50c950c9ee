"""Spend reports (issue 19 §2): a digest per organization (or one for all) on a
schedule, with a chart.

    schedule.py  when a report is due: "mon 09:00", "daily 08:00", "monthly 1 09:00"
                 in a time zone (pure)
    data.py      what a report says: month to date, the same point last month, the
                 forecast against the budget, top projects and SKUs, firing alerts (pure)
    chart.py     the chart, a PNG drawn with matplotlib (Agg), imported only by the
                 process that draws it (``python -m invoice_watch.report.chart``)
    render.py    that child process, started, bounded (time, PNG size) and read for
                 each chart: the daemon never imports matplotlib
    message.py   the email (HTML with the chart inline, by cid, and plain text) and the
                 text summary

Importing this package (or any of its modules) never imports matplotlib: the daemon's
memory does not grow because reports exist, due or not.
"""
