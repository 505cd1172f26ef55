"""Reading a study: status, export, report and the dashboard."""
