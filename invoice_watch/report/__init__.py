"""Spend reports (issue 19 §2): a digest per organization (or one for all) on a
schedule, with a chart.

    schedule.py  when a report is due: "mon 09:00", "daily 08:00", "monthly 1 09:00"
                 in a time zone (pure)
    data.py      what a report says: month to date, the same point last month, the
                 forecast against the budget, top projects and SKUs, firing alerts (pure)
    chart.py     the chart, a PNG drawn with matplotlib (Agg), imported only when a
                 report is drawn, and drawn off the event loop
    message.py   the email (HTML with the chart inline, by cid, and plain text) and the
                 text summary

Importing this package (or schedule.py and data.py) never imports matplotlib: a daemon
whose reports are not due pays nothing for them.
"""
