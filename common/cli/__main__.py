from common.cli import app

app()
