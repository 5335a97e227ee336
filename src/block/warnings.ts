/**
 * Warnings the block layer gives a person without failing the operation (QEMU prints them on
 * stderr, e.g. raw_open's "Image format was not specified ..."). They go to stderr unless a
 * program installs its own sink (the tests, a library user with its own log).
 *
 * Common code: any thread of control may warn; the sink is called synchronously.
 */

/** Where warnings go: a function taking the whole text (it may span lines, no final newline). */
export type WarningSink = (text: string) => void;

const toStderr: WarningSink = (text) => {
  process.stderr.write(`${text}\n`);
};

let sink: WarningSink = toStderr;

/**
 * Sends `text` to the warning sink.
 * @locking common
 */
export function blockWarning(text: string): void {
  sink(text);
}

/**
 * Replaces the warning sink (null: back to stderr); returns the previous one.
 * @locking common
 */
export function setWarningSink(next: WarningSink | null): WarningSink {
  const prev = sink;
  sink = next ?? toStderr;
  return prev;
}
