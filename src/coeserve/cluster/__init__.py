"""Scale-out on Ray Serve (optional: pip install coeserve[ray])."""
