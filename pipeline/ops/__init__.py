"""What operators read: status, reports, pages, the run log, metrics."""
