"""The Kumo controller: HTTPS API, store, CA and enrollment, scheduler, alerts."""
