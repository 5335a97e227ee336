#!/usr/bin/env node
// The snapstack command; the code lives in dist/cli (built by `npm install` / `npm run build`).
import { main } from '../dist/cli/main.js';

process.exitCode = await main(process.argv.slice(2));
