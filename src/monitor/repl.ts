/**
 * The monitor's read-eval-print loop on a stream pair. On a terminal: prompt `(snapstack) `,
 * line editing, history and tab completion (node:readline). On piped input: one command a line,
 * no prompt and no escape codes, and the loop ends at end of input.
 */
import readline from 'node:readline';
import type { Monitor } from './hmp.js';

/** Reads commands from `input` until `quit` or end of input. */
export async function runRepl(monitor: Monitor, input: NodeJS.ReadableStream & { isTTY?: boolean }, output: NodeJS.WritableStream, banner: string[]): Promise<void> {
  const interactive = input.isTTY === true;
  const rl = readline.createInterface({
    input,
    output: interactive ? output : undefined,
    terminal: interactive,
    historySize: 1000,
    completer: interactive ? (line: string): [string[], string] => [monitor.completions(line), line] : undefined,
  });
  for (const line of banner) output.write(`${line}\n`);
  rl.setPrompt('(snapstack) ');
  if (interactive) rl.prompt();
  try {
    for await (const line of rl) {
      await monitor.execute(line);
      if (monitor.quitRequested) break;
      if (interactive) rl.prompt();
    }
  } finally {
    rl.close();
  }
}
