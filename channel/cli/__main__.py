from channel.cli import app

app()
