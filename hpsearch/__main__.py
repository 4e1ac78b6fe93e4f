from hpsearch.cli import main

main(prog_name="hpsearch")
