"""The musiclora service: Ray Serve app (app.py), HTTP API (api.py), model host (host.py), web page (ui.py)."""
