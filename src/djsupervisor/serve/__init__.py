"""The supervisor's socket servers, on its selector loop: the control socket, HTTP metrics and status page,
and the formats they answer with (status table, Prometheus text, HTML)."""
