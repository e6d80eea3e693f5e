from weightmix.cli import command

command()
