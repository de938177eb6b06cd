#!/usr/bin/env node
// Compiles contracts/src/*.sol with the pinned solc-js from node_modules and writes one JSON
// artifact per contract (abi, bytecode, compiler version, settings) to contracts/artifacts/
// and, identical, to mock_kms/data/ (the copy the Python package ships).
//
//   node contracts/compile.js           write the artifacts
//   node contracts/compile.js --check   recompile and compare byte for byte; exit 1 on a difference
//   node contracts/compile.js --stdout  print the artifact of ImageAllowlist instead of writing
//   node contracts/compile.js --stdout ProvenanceCheck   the same for another contract
//
// Each source file gives one artifact: the contract named like the file (interfaces declared
// beside it, such as IKmsSignerRegistry in ProvenanceCheck.sol, get none).
'use strict';

const fs = require('fs');
const path = require('path');
const crypto = require('crypto');
const solc = require('solc');

const ROOT = path.resolve(__dirname, '..');
const SOURCES = ['contracts/src/ImageAllowlist.sol', 'contracts/src/ProvenanceCheck.sol'];
const OUTPUTS = ['contracts/artifacts', 'mock_kms/data'];
const SETTINGS = {
  evmVersion: 'cancun',
  optimizer: { enabled: true, runs: 1000 },
  metadata: { bytecodeHash: 'ipfs' },
  outputSelection: {
    '*': { '*': ['abi', 'evm.bytecode.object', 'evm.deployedBytecode.object'] },
  },
};

function pinnedVersion() {
  const pkg = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8'));
  return pkg.devDependencies.solc;
}

function compile() {
  const wanted = pinnedVersion();
  const version = solc.version();
  if (!version.startsWith(wanted + '+')) {
    throw new Error(`solc-js ${version} is installed; package.json pins ${wanted}: run npm ci`);
  }
  const sources = {};
  for (const rel of SOURCES) {
    sources[rel] = { content: fs.readFileSync(path.join(ROOT, rel), 'utf8') };
  }
  const input = { language: 'Solidity', sources, settings: SETTINGS };
  const output = JSON.parse(solc.compile(JSON.stringify(input)));
  const problems = (output.errors || []).filter((e) => e.severity !== 'info');
  if (problems.length) {
    throw new Error(problems.map((e) => e.formattedMessage).join('\n'));
  }
  const artifacts = {};
  for (const rel of SOURCES) {
    for (const [name, c] of Object.entries(output.contracts[rel])) {
      if (name !== path.basename(rel, '.sol')) continue;
      const artifact = {
        contractName: name,
        sourceName: rel,
        sourceSha256: crypto.createHash('sha256').update(sources[rel].content).digest('hex'),
        compiler: { name: 'solc-js', version },
        settings: { evmVersion: SETTINGS.evmVersion, optimizer: SETTINGS.optimizer, metadata: SETTINGS.metadata },
        abi: c.abi,
        bytecode: '0x' + c.evm.bytecode.object,
        deployedBytecode: '0x' + c.evm.deployedBytecode.object,
      };
      artifacts[`${name}.json`] = JSON.stringify(artifact, null, 2) + '\n';
    }
  }
  return artifacts;
}

function main(argv) {
  const artifacts = compile();
  const at = argv.indexOf('--stdout');
  if (at >= 0) {
    const name = argv[at + 1] || 'ImageAllowlist';
    if (!artifacts[`${name}.json`]) throw new Error(`no contract named ${name}`);
    process.stdout.write(artifacts[`${name}.json`]);
    return 0;
  }
  const check = argv.includes('--check');
  let stale = 0;
  for (const dir of OUTPUTS) {
    for (const [file, text] of Object.entries(artifacts)) {
      const target = path.join(ROOT, dir, file);
      if (check) {
        const current = fs.existsSync(target) ? fs.readFileSync(target, 'utf8') : null;
        if (current !== text) {
          console.error(`${path.join(dir, file)} differs from a fresh compile`);
          stale += 1;
        }
      } else {
        fs.writeFileSync(target, text);
        console.error(`wrote ${path.join(dir, file)}`);
      }
    }
  }
  if (check && stale === 0) console.error('artifacts match a fresh compile');
  return stale ? 1 : 0;
}

try {
  process.exitCode = main(process.argv.slice(2));
} catch (e) {
  console.error(`compile failed: ${e.message}`);
  process.exitCode = 2;
}
