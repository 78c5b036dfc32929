"""Several engine replicas behind a global scheduler, on Ray Serve (issue 15)."""
